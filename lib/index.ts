export { Agent, type AgentOptions, type Notification, type Disconnect, type SecurityCounters, type AgentHealth, type Rebuilt } from './agent';
export { DescriptorList, type ByteSpans, type DescriptorTarget } from './descriptors';
export { KvwireError, type ErrorCode } from './errors';
export { Peer, Region, RemoteRegion, type Access, type DeviceMemory, type MemoryKind, type RegionOptions } from './memory';
export { Transfer, type TransferOptions, type TransferPath, type TransferState, type TransferStats } from './transfer';
import { addon } from './native';

/** The UCX version the addon runs against (e.g. '1.13.1'). */
export function ucxVersion(): string {
  return addon.ucxVersion();
}

/** Decodes a metadata blob without loading it (for tools and tests). Throws ERR_INVALID_PARAM if malformed. */
export function decodeMetadata(blob: Uint8Array): unknown {
  return addon.decodeMetadata(blob);
}
export { KvLayout, type KvLayoutSpec, type KvTransferPlan, type KvArrangement, type KvOrder, type BlockLayout } from './kv/layout';
export { KvSender, KvReceiver, KvPublication, STAGING_REGION, POOL_REGION, type KvSenderOptions, type PublishOptions, type PullRequest, type PullResult } from './kv/worker';
export { KvRouterEndpoint, KvwireRouterTransport, type KvTransport, type MoveRequest, type MoveResult, type PairStats, type WorkerInfo } from './router';
