export { Agent, type AgentOptions, type Notification, type Disconnect, type SecurityCounters, type AgentHealth, type Rebuilt, type ConnectionInfo } from './agent';
export { parseEndpointInfo, protocolFor, type EndpointProtocols, type ProtocolTable, type ProtocolRange } from './ucx-protocols';
export { DescriptorList, type ByteSpans, type DescriptorTarget } from './descriptors';
export { KvwireError, type ErrorCode } from './errors';
export { Peer, Region, RemoteRegion, copyRuns, type Access, type DeviceMemory, type MemoryKind, type RegionOptions } from './memory';
export { Transfer, type TransferOptions, type TransferPath, type TransferState, type TransferStats } from './transfer';
import { addon, type NativeCudaInfo } from './native';

export type CudaInfo = NativeCudaInfo;

/**
 * The CUDA driver kvwire would use here (libcuda.so.1, or what KVWIRE_CUDA_DRIVER names) and its
 * devices, or why there is none; `testDouble` is set when it is kvwire's CUDA test double.
 */
export function cudaInfo(): CudaInfo {
  return addon.cudaInfo();
}

/** What the running UCX offers with this process's UCX_* settings: transports ("tcp/lo", …) and memory types. */
export function ucxInfo(): { transports: string[]; memoryTypes: string[]; error?: string } {
  return addon.ucxInfo();
}

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
