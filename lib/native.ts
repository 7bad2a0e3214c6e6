// The only file that loads the native addon. Everything else uses the typed surface below.
import * as path from 'node:path';
import { KvwireError } from './errors';

export interface NativeRegion {
  id: number;
  name: string;
  kind: 'dram' | 'vram';
  access: 'read' | 'write' | 'readwrite';
  deviceId: number;
  base: bigint;
  length: number;
  allocated: boolean;
  /** Same-host peers can reach it: always for host memory; for VRAM, when it carries a CUDA IPC handle. */
  exported: boolean;
}

export interface NativePeer {
  name: string;
  agentId: bigint;
  generation: number;
  regions: NativeRegion[];
}

export interface NativeAgentOptions {
  transports?: string;
  devices?: string;
  secret?: Buffer;
  progress?: 'event' | 'poll';
  spinWindowUs?: number;
  cma?: boolean;
  progressThread?: boolean;
  progressGraceUs?: number;
}

export interface NativeCudaInfo {
  available: boolean;
  /** Why there is no usable CUDA device (driver missing, no device, initialisation failed). */
  reason?: string;
  /** The library loaded (libcuda.so.1, or what KVWIRE_CUDA_DRIVER names). */
  driver?: string;
  /** Set when the driver is kvwire's CUDA test double (host memory, no GPU). */
  testDouble?: string;
  version?: number;
  devices: { ordinal: number; name: string; totalBytes: number }[];
  /** Why a trial CUDA IPC export on device 0 failed (absent when it worked). */
  ipcProblem?: string;
}

/** Row layout of the Float64Array passed to onSettled, one row per settled transfer. */
export const SETTLED_STRIDE = 9;

export interface NativeAgent {
  allocate(name: string, bytes: number, access: string): { region: NativeRegion; bytes: Uint8Array };
  register(name: string, view: Uint8Array, access: string, hugePages?: boolean): NativeRegion;
  allocateVram(name: string, bytes: number, access: string, device: number): NativeRegion;
  registerVram(name: string, address: bigint, bytes: number, access: string, device: number): NativeRegion;
  writeRegion(regionId: number, offset: number, bytes: Uint8Array): void;
  readRegion(regionId: number, offset: number, into: Uint8Array): void;
  deregister(regionId: number): void;
  metadata(): Buffer;
  loadPeer(blob: Uint8Array): NativePeer;
  forgetPeer(name: string): void;
  post(
    op: 0 | 1,
    path: number,
    localRegion: number,
    localOffsets: Float64Array,
    localLengths: Float64Array,
    peer: string,
    peerAgentId: bigint,
    remoteRegion: number,
    remoteOffsets: Float64Array,
    remoteLengths: Float64Array,
    notify?: Uint8Array,
  ): number;
  cancel(id: number, timeout: boolean, why: string): boolean;
  notify(peer: string, message: Uint8Array): void;
  close(): Promise<void>;
  setRef(ref: boolean): void;
  rebuildTransport(): void;
  /** The transport's own description of each open connection (UCX: ucp_ep_print_info). */
  connections(): { peer: string; outbound: boolean; text: string }[];
  securityCounters(): { droppedUnauthenticated: number; failedHandshakes: number; refusedAddresses: number; receiveBlocked: boolean; rebuilds: number; retiredRegions: number; gpuKernelBatches: number; vramStagedBytes: number; progressThreadSteps: number; droppedNotifications: number; gpuFault: string | null };
}

interface Addon {
  NativeAgent: new (
    name: string,
    options: NativeAgentOptions,
    onSettled: (rows: Float64Array, errors: (KvwireError | null)[]) => void,
    /** A Buffer is a notification from `from`; a string is why the connection with `from` ended. */
    onNotification: (from: string[], messages: (Buffer | string)[]) => void,
  ) => NativeAgent;
  setErrorClass(cls: typeof KvwireError): void;
  decodeMetadata(blob: Uint8Array): unknown;
  ucxVersion(): string;
  cudaInfo(): NativeCudaInfo;
  ucxInfo(): { transports: string[]; memoryTypes: string[]; error?: string };
  copyRuns(dst: Uint8Array, dstOffsets: Float64Array, src: Uint8Array, srcOffsets: Float64Array, lengths: Float64Array): void;
}

// UCX's memory hooks (UCM) patch malloc/mmap when libucp loads; inside Node, whose allocations
// predate them, they corrupted the heap in about one process start in twenty under load. kvwire
// registers memory explicitly, so it does not need them. A caller's own setting wins.
process.env.UCX_MEM_MALLOC_HOOKS ??= 'no';
process.env.UCX_MEM_MMAP_HOOK_MODE ??= 'none';

// KVWIRE_ADDON=<path to kvwire.node> loads another build (e.g. one linked against a different UCX).
function load(): Addon {
  const root = path.join(__dirname, '..');
  const override = process.env.KVWIRE_ADDON;
  try {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const addon = (override ? require(path.resolve(override)) : require('node-gyp-build')(root)) as Addon;
    addon.setErrorClass(KvwireError);
    return addon;
  } catch (err) {
    throw new KvwireError(
      'ERR_UNAVAILABLE',
      `kvwire native addon could not be loaded from ${override ?? root} (run \`npm run build\`): ${(err as Error).message}`,
    );
  }
}

export const addon: Addon = load();
