import { constants as bufferConstants } from 'node:buffer';
import { DescriptorList, type ByteSpans } from './descriptors';
import { KvwireError } from './errors';
import { addon, type NativeRegion } from './native';

/**
 * A local gather/scatter between two host buffers: run i copies `lengths[i]` bytes from
 * `src[srcOffsets[i]]` to `dst[dstOffsets[i]]`, in one native call. Every run is checked against
 * both buffers first (ERR_INVALID_PARAM naming the first bad index): a bad list copies nothing.
 */
export function copyRuns(dst: Uint8Array, dstOffsets: Float64Array, src: Uint8Array, srcOffsets: Float64Array, lengths: Float64Array): void {
  addon.copyRuns(dst, dstOffsets, src, srcOffsets, lengths);
}

export type Access = 'read' | 'write' | 'readwrite';
export type MemoryKind = 'dram' | 'vram';

export interface RegionOptions {
  /** Name peers use to find the region (`peer.region('kv')`). */
  name: string;
  /** What peers may do with it. Default 'readwrite'. Local use is never restricted. */
  access?: Access;
  /**
   * `register` only: advise transparent huge pages (`madvise(MADV_HUGEPAGE)`) for the whole 2 MiB
   * pages inside the memory. Same-host copies (path 'cma') pin every page in the kernel, so a pool
   * of huge pages moves faster (README: Performance). Only pages first touched after registering
   * become huge ones — register a pool before filling it. The advice stays on that address range
   * after `deregister` (as numpy leaves it on its arrays). ERR_UNAVAILABLE where the machine has
   * transparent huge pages off.
   */
  hugePages?: boolean;
  /**
   * `allocate` only: 'dram' (default, host memory through UCX) or 'vram' (GPU memory of CUDA device
   * `device`, through the CUDA driver; ERR_UNAVAILABLE with the reason where there is none).
   */
  memory?: MemoryKind;
  /** The CUDA device of a 'vram' allocation (default 0). */
  device?: number;
}

/** GPU memory another library in this process owns (e.g. a framework's KV cache), for `register`. */
export interface DeviceMemory {
  /** CUDA device ordinal (as this process numbers them). */
  device: number;
  /** Device address of the first byte (e.g. `tensor.data_ptr()`). */
  address: bigint;
  /** Length in bytes: must lie inside one allocation of that device. */
  bytes: number;
}

/** What a region is, as its metadata says: shared by this agent's regions and a peer's. */
abstract class RegionDescription {
  /** @internal */
  constructor(/** @internal */ readonly native: NativeRegion) {}
  get id(): number {
    return this.native.id;
  }
  get name(): string {
    return this.native.name;
  }
  /** 'dram' (host memory) or 'vram' (GPU memory of CUDA device `device`). */
  get kind(): MemoryKind {
    return this.native.kind;
  }
  /** The CUDA device of a VRAM region (0 for host memory). */
  get device(): number {
    return this.native.deviceId;
  }
  /** What peers may do with it. */
  get access(): Access {
    return this.native.access;
  }
  get length(): number {
    return this.native.length;
  }
  /** True when kvwire allocated it (a same-host peer can map it and copy directly). */
  get allocated(): boolean {
    return this.native.allocated;
  }
  /**
   * Whether peers can reach it. Always true for host memory. For VRAM: whether it was published
   * with a CUDA IPC handle — only a whole CUDA allocation of whole 2 MiB granules is (the handle
   * opens all of it); a registered part of a larger allocation is used locally only.
   */
  get exported(): boolean {
    return this.native.exported;
  }
}

/** @internal How a region copies between host memory and itself (through its agent). */
export interface RegionIo {
  write(regionId: number, offset: number, bytes: Uint8Array): void;
  read(regionId: number, offset: number, into: Uint8Array): void;
}

/** Memory this agent registered or allocated. Peers see it in the agent's metadata. */
export class Region extends RegionDescription {
  #live = true;
  readonly #bytes: Uint8Array | null;
  readonly #io: RegionIo;
  /** @internal */
  constructor(native: NativeRegion, bytes: Uint8Array | null, io: RegionIo) {
    super(native);
    this.#bytes = bytes;
    this.#io = io;
  }

  /**
   * A view of the region's bytes (host memory only). A VRAM region has none — its bytes live on the
   * GPU: use `write` and `read` (ERR_NOT_ALLOWED).
   */
  get bytes(): Uint8Array {
    if (this.#bytes === null)
      throw new KvwireError('ERR_NOT_ALLOWED', `region '${this.name}' is VRAM on CUDA device ${this.device}: it has no host view; use region.write(offset, bytes) and region.read(offset, length)`);
    return this.#bytes;
  }

  /** Where the region starts: a device address for VRAM (what CUDA libraries take), a host address otherwise. */
  get address(): bigint {
    return this.native.base;
  }

  /** Copies `data` into the region at byte `offset` (host to device for VRAM; synchronous). */
  write(offset: number, data: ArrayBufferView | ArrayBuffer | SharedArrayBuffer): void {
    const isBuffer = data instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && data instanceof SharedArrayBuffer);
    const bytes = ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
      : isBuffer ? new Uint8Array(data) : null;
    if (bytes === null) throw new KvwireError('ERR_INVALID_PARAM', 'data: must be a Buffer, typed array, DataView, ArrayBuffer or SharedArrayBuffer');
    this.#checkRange('write', offset, bytes.byteLength);
    this.#io.write(this.id, offset, bytes);
  }

  /** Copies `length` bytes at byte `offset` out of the region (device to host for VRAM; synchronous). */
  read(offset: number, length: number): Buffer {
    this.#checkRange('read', offset, length);
    if (length > bufferConstants.MAX_LENGTH)
      throw new KvwireError('ERR_INVALID_PARAM', `length: ${length} bytes is more than one Buffer holds (${bufferConstants.MAX_LENGTH}); read in parts`);
    const out = Buffer.alloc(length);
    this.#io.read(this.id, offset, out);
    return out;
  }

  #checkRange(what: string, offset: number, length: number): void {
    if (!this.#live) throw new KvwireError('ERR_NOT_FOUND', `region '${this.name}' was deregistered`);
    if (this.#bytes !== null && this.#bytes.byteLength !== this.length)
      throw new KvwireError('ERR_INVALID_PARAM', `region '${this.name}' lost its memory (its ArrayBuffer was detached); deregister it`);
    if (!Number.isSafeInteger(offset) || offset < 0)
      throw new KvwireError('ERR_INVALID_PARAM', `offset: must be a non-negative integer, got ${offset}`);
    if (!Number.isSafeInteger(length) || length < 0)
      throw new KvwireError('ERR_INVALID_PARAM', `length: must be a non-negative integer, got ${length}`);
    if (offset > this.length || length > this.length - offset)
      throw new KvwireError('ERR_INVALID_PARAM', `${what}: [${offset}, +${length}) lies outside region '${this.name}' (${this.length} bytes)`);
  }

  get live(): boolean {
    return this.#live;
  }
  /** @internal */
  markDeregistered(): void {
    this.#live = false;
  }

  /** Descriptors at `offsets` (bytes from the region start) of `lengths` bytes (or one length for all). */
  descriptors(offsets: ByteSpans | number, lengths: ByteSpans | number): DescriptorList<Region> {
    if (!this.#live) throw new KvwireError('ERR_NOT_FOUND', `region '${this.name}' was deregistered`);
    return DescriptorList.build(this, offsets, lengths);
  }
}

/** A region of a peer, as its metadata describes it. */
export class RemoteRegion extends RegionDescription {
  /** @internal */
  constructor(
    readonly peer: string,
    /** @internal */ readonly peerAgentId: bigint,
    native: NativeRegion,
  ) {
    super(native);
  }
  descriptors(offsets: ByteSpans | number, lengths: ByteSpans | number): DescriptorList<RemoteRegion> {
    return DescriptorList.build(this, offsets, lengths);
  }
}

/** A remote agent whose metadata is loaded. */
export class Peer {
  /** @internal */
  constructor(
    readonly name: string,
    /** @internal */ readonly agentId: bigint,
    /** Bumps each time the peer re-publishes with changed regions. */
    readonly generation: number,
    readonly regions: readonly RemoteRegion[],
  ) {}

  /** The region with this name or id; ERR_NOT_FOUND if the peer does not publish it. */
  region(nameOrId: string | number): RemoteRegion {
    const r = this.regions.find((x) => (typeof nameOrId === 'number' ? x.id === nameOrId : x.name === nameOrId));
    if (!r) throw new KvwireError('ERR_NOT_FOUND', `peer '${this.name}' has no region ${JSON.stringify(nameOrId)}`);
    return r;
  }
}
