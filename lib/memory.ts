import { DescriptorList, type ByteSpans } from './descriptors';
import { KvwireError } from './errors';
import type { NativeRegion } from './native';

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
  get kind(): MemoryKind {
    return this.native.kind;
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
}

/** Memory this agent registered or allocated. Peers see it in the agent's metadata. */
export class Region extends RegionDescription {
  #live = true;
  /** @internal */
  constructor(
    native: NativeRegion,
    /** A view of the region's bytes. */
    readonly bytes: Uint8Array,
  ) {
    super(native);
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
