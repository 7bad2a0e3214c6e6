import { EventEmitter } from 'node:events';
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { isMainThread, markAsUntransferable } from 'node:worker_threads';
import { DescriptorList } from './descriptors';
import { check, KvwireError } from './errors';
import { Peer, Region, RemoteRegion, type Access, type DeviceMemory, type RegionIo, type RegionOptions } from './memory';
import { addon, SETTLED_STRIDE, type NativeAgent, type NativePeer } from './native';
import { PATH_NAMES, Transfer, type TransferOptions, type TransferPath, type TransferStats } from './transfer';
import { parseEndpointInfo, type EndpointProtocols } from './ucx-protocols';

export interface AgentOptions {
  /** The name peers know this agent by (1..255 bytes). */
  name: string;
  /**
   * 'event' (default): sleep on UCX's event fd between bursts, so an idle agent uses no CPU.
   * 'poll': spin the event loop while the agent is open, for the lowest latency at the cost of a core.
   */
  progress?: 'event' | 'poll';
  /** In event mode, keep polling this long after any activity before sleeping (default 200 µs). */
  spinWindowUs?: number;
  /**
   * A native progress thread (default true; false with `progress: 'poll'`, whose spinning loop it
   * would interrupt: 4 KiB ping-pong p99 over shm 146-381 µs with it, 59-104 µs without, on 2
   * vCPUs): it sleeps on UCX's event fd beside the event loop and,
   * when the JS thread has not progressed the agent within `progressGraceUs` of an event (JS busy
   * with the application, or descheduled), progresses it itself — rendezvous, acknowledgements and
   * peers' requests go on while JS is late. Completions and notifications still reach JS on its own
   * thread. Idle, it sleeps (no CPU). `false`: progress only on the event loop, as before.
   */
  progressThread?: boolean;
  /** How long the progress thread leaves an event to the JS thread before taking it (default 1000 µs, 50..1e6). */
  progressGraceUs?: number;
  /** UCX settings: `transports` becomes UCX_TLS (e.g. 'shm,self' or 'tcp'), `devices` UCX_NET_DEVICES. */
  ucx?: { transports?: string; devices?: string };
  /**
   * Shared secret (1..4096 bytes) of every agent allowed to talk to this one. When set,
   * `metadata()` is sealed (AES-256-GCM: only holders of the secret can read or alter it) and
   * `loadPeer` refuses metadata that is not sealed with the same secret (ERR_NOT_ALLOWED); every
   * connection completes a mutual HMAC challenge-response before anything on it is served, so
   * `from` is a proven name; and UCX's software RMA is off (path 'rma' is unavailable), since it
   * would let any connected process write anywhere in this one. Without a secret, any process
   * that can reach this agent's UCX worker is trusted (README: Security and reliability).
   */
  secret?: string | Uint8Array;
  /**
   * Same-host one-sided copies (path 'cma', default true): a peer on this host that proved which
   * process it is may copy into and out of this agent's registered regions itself, with Linux
   * process_vm_readv/writev, without waking this agent; and this agent does so into such peers.
   * The kernel allows it only between processes that could ptrace each other (same user). Bounds
   * and access come from a table in the target's own memory, read before every copy (not from
   * metadata); README: Security and reliability. Needs a shared-memory transport (UCX_TLS 'shm',
   * 'sm', 'cma' or all). `false`: this agent neither grants nor uses it (active messages instead).
   */
  cma?: boolean;
}

/** See {@link Agent.health}. */
export interface AgentHealth {
  receiveBlocked: boolean;
  rebuilds: number;
  /** Deregistered regions still held for a same-host peer's one-sided copies (see `health`). */
  retiredRegions: number;
  /** VRAM<->VRAM batches (path 'cuda_ipc') this agent ran as one launch of its copy kernel. */
  gpuKernelBatches: number;
  /**
   * VRAM bytes this agent copied between the device and host memory for path 'am' (staging: all of
   * them where its UCX has no CUDA memory support, the packed small segments where it has).
   */
  vramStagedBytes: number;
  /**
   * Progress steps this agent's native progress thread took: the JS thread had left an event
   * untaken for the grace period, or (its 10 ms watchdog) work was in flight and JS had not stepped.
   * 0 with `progressThread: false`.
   */
  progressThreadSteps: number;
  /**
   * Why this agent's first failed GPU copy failed (null: none). A CUDA fault such as an illegal
   * address is sticky for the whole context (the application's too): restart the process.
   */
  gpuFault: string | null;
}

/**
 * The agent opened a new UCX worker (its shared-memory receive queue was blocked by a peer that died
 * writing into it): transfers in flight failed with ERR_REMOTE_DISCONNECT, loaded peers are connected
 * again by themselves, and its metadata changed — agents that loaded it must load `metadata()` again.
 */
export interface Rebuilt {
  reason: string;
}

/** What an agent's trust boundary refused (cumulative; see README, Security and reliability). */
export interface SecurityCounters {
  /** Messages dropped because their connection had not completed the authenticated handshake. */
  droppedUnauthenticated: number;
  /** Handshake proofs that did not verify (a peer without this agent's secret). */
  failedHandshakes: number;
  /**
   * Peer worker addresses refused before UCX parsed them (UCX aborts the process on some malformed
   * ones): in HELLO messages, and in metadata given to `loadPeer` (which then fails ERR_INVALID_PARAM).
   */
  refusedAddresses: number;
}

/** One open connection as the transport describes it (`agent.connections()`). */
export interface ConnectionInfo {
  /** The other agent's name. */
  peer: string;
  /** outbound: this agent's connection to a loaded peer (WRITE data and READ requests go on it); inbound: one a peer opened (READ data goes back on it). */
  direction: 'outbound' | 'inbound';
  /** UCX's own description of the endpoint (ucp_ep_print_info), verbatim. */
  text: string;
  /** The same, parsed: lanes and, per operation and message size, the protocol UCX selected. */
  protocols: EndpointProtocols;
}

/** A notification from a peer; `from` comes from the connection, not from the message. */
export interface Notification {
  from: string;
  message: Buffer;
}

/**
 * A connection with a peer ended: it closed its agent (or its process exited), our endpoint to it
 * failed, or UCX lost it. May be emitted more than once for one peer (once per connection).
 */
export interface Disconnect {
  peer: string;
  reason: string;
}

// Agents still open when the process exits say goodbye to their peers (synchronously, bounded to
// ~20 ms each), so a peer on shared memory learns at once instead of after UCX's ~1 s keepalive.
// Held weakly: an agent nobody references any more is not kept alive by this. In a worker_thread
// the agent's own teardown (when the thread's environment goes) says goodbye instead.
const openAgents = new Set<WeakRef<Agent>>();
let exitHooked = false;
function closeOnExit(agent: Agent): WeakRef<Agent> | null {
  if (!isMainThread) return null;
  const ref = new WeakRef(agent);
  openAgents.add(ref);
  if (!exitHooked) {
    exitHooked = true;
    // close() says goodbye synchronously before its first await; what it awaits never runs here.
    process.on('exit', () => {
      for (const r of [...openAgents]) {
        try {
          r.deref()?.close().catch(() => {});
        } catch {
          // exiting anyway: UCX keepalive will tell the peers
        }
      }
    });
  }
  return ref;
}

const MAX_SECRET_BYTES = 4096;

// Whether UCX may listen beyond loopback with these settings: a network transport (or UCX's
// default, all of them) on devices other than 'lo'.
function reachableBeyondLoopback(ucx: AgentOptions['ucx']): boolean {
  const tls = (ucx?.transports ?? process.env.UCX_TLS ?? 'all').toLowerCase();
  const network = tls.startsWith('^') || tls.split(',').some((t) => /^(all|tcp|ib|rc.*|ud.*|dc.*|rdmacm|sockcm)$/.test(t.trim()));
  if (!network) return false;
  const devices = (ucx?.devices ?? process.env.UCX_NET_DEVICES ?? 'all').split(',').map((d) => d.trim());
  return !devices.every((d) => /^lo(:\d+)?$/.test(d)); // 'lo', or a port of it ('lo:1')
}
let warnedNoSecret = false;

// Metadata of an agent with a secret is sealed: 'KVWS' | 12-byte IV | AES-256-GCM ciphertext | 16-byte
// tag, under HKDF-SHA256(secret, info 'kvwire metadata v1'), the magic as additional data. Sealed, not
// only signed: the worker address and the memory keys in it are capabilities (with a key, UCX's
// direct mapping or a hardware RMA reaches the region without kvwire), so only holders of the
// secret may read them.
const SEAL_MAGIC = Buffer.from('KVWS');
const SEAL_IV_BYTES = 12;
const SEAL_TAG_BYTES = 16;
function sealKey(secret: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', secret, Buffer.alloc(0), 'kvwire metadata v1', 32));
}
const ACCESS: readonly Access[] = ['read', 'write', 'readwrite'];
const MAX_NAME_BYTES = 255;
/** Notifications are small control messages: at most 16 MiB, sent or accepted (the native side checks the same). */
export const MAX_NOTIFY_BYTES = 16 << 20;
/** At most this many notifications (and bytes of them) wait for a `notifications()` iterator. */
export const MAX_QUEUED_NOTIFICATIONS = 65_536;
export const MAX_QUEUED_NOTIFICATION_BYTES = 256 << 20;

function toBytes(field: string, value: string | Uint8Array): Uint8Array {
  if (typeof value === 'string') return Buffer.from(value, 'utf8');
  check(value instanceof Uint8Array, field, 'must be a string or a Uint8Array');
  return value;
}

function notificationBytes(field: string, value: string | Uint8Array): Uint8Array {
  const bytes = toBytes(field, value);
  check(bytes.byteLength <= MAX_NOTIFY_BYTES, field, `is ${bytes.byteLength} bytes; at most ${MAX_NOTIFY_BYTES}`);
  return bytes;
}

/**
 * One kvwire endpoint: registers memory, publishes metadata, loads peers and moves descriptor
 * lists to and from them. Emits 'notification' events (also available as `notifications()`) and
 * 'disconnect' events ({@link Disconnect}) when a connection with a peer ends.
 */
export class Agent extends EventEmitter {
  readonly name: string;
  #native: NativeAgent | null;
  #secret: Buffer | null;
  #sealKey: Buffer | null;
  #transfers = new Map<number, Transfer>();
  #regions = new Map<number, Region>();
  #peers = new Map<string, Peer>();
  #waiters: ((n: IteratorResult<Notification>) => void)[] = [];
  #queue: Notification[] = [];
  #queuedBytes = 0;
  #dropped = 0;
  #nativeDropped = 0; // the native side's count, kept once the agent is closed
  #iterating = 0;
  #closing: Promise<void> = Promise.resolve();
  #exitRef: WeakRef<Agent> | null = null;

  private constructor(options: AgentOptions) {
    super();
    this.name = options.name;
    this.#secret = options.secret === undefined ? null : Buffer.from(toBytes('secret', options.secret));
    this.#sealKey = this.#secret && sealKey(this.#secret);
    this.#native = new addon.NativeAgent(
      options.name,
      {
        transports: options.ucx?.transports,
        devices: options.ucx?.devices,
        secret: this.#secret ?? undefined,
        progress: options.progress ?? 'event',
        spinWindowUs: options.spinWindowUs,
        cma: options.cma ?? true,
        // Poll mode spins the event loop for latency: the thread's periodic look would cost its tail.
        progressThread: options.progressThread ?? options.progress !== 'poll',
        progressGraceUs: options.progressGraceUs ?? 1000,
      },
      (rows, errors) => this.#onSettled(rows, errors),
      (from, messages) => this.#onNotifications(from, messages),
    );
    this.#exitRef = closeOnExit(this);
    if (!this.#secret && !warnedNoSecret && reachableBeyondLoopback(options.ucx)) {
      warnedNoSecret = true;
      process.emitWarning(
        `kvwire: agent '${options.name}' may be reachable beyond loopback (UCX transports '${options.ucx?.transports ?? process.env.UCX_TLS ?? 'all'}') ` +
          'without a secret: any process that can reach it may read and write its exported regions and send it notifications. ' +
          "Give every agent the same `secret` (README: Security and reliability). Warned once per process.",
        { code: 'KVWIRE_NO_SECRET' },
      );
    }
  }

  /** Creates an agent with its UCX context and worker. */
  static async create(options: AgentOptions): Promise<Agent> {
    check(options && typeof options === 'object', 'options', 'must be an object');
    check(typeof options.name === 'string' && options.name.length > 0, 'name', 'must be a non-empty string');
    check(Buffer.byteLength(options.name) <= MAX_NAME_BYTES, 'name', `must be at most ${MAX_NAME_BYTES} bytes`);
    check(
      options.progress === undefined || options.progress === 'event' || options.progress === 'poll',
      'progress',
      `must be 'event' or 'poll', got ${String(options.progress)}`,
    );
    check(
      options.spinWindowUs === undefined || (Number.isFinite(options.spinWindowUs) && options.spinWindowUs >= 0),
      'spinWindowUs',
      'must be a non-negative number',
    );
    check(options.cma === undefined || typeof options.cma === 'boolean', 'cma', `must be a boolean, got ${typeof options.cma}`);
    check(
      options.progressThread === undefined || typeof options.progressThread === 'boolean',
      'progressThread',
      `must be a boolean, got ${typeof options.progressThread}`,
    );
    check(
      options.progressGraceUs === undefined ||
        (typeof options.progressGraceUs === 'number' && Number.isFinite(options.progressGraceUs) &&
          options.progressGraceUs >= 50 && options.progressGraceUs <= 1e6),
      'progressGraceUs',
      `must be a number of microseconds in [50, 1000000], got ${String(options.progressGraceUs)}`,
    );
    if (options.secret !== undefined) {
      const secret = toBytes('secret', options.secret);
      check(secret.byteLength > 0 && secret.byteLength <= MAX_SECRET_BYTES, 'secret', `must be 1..${MAX_SECRET_BYTES} bytes, got ${secret.byteLength}`);
    }
    if (options.ucx !== undefined) {
      check(typeof options.ucx === 'object' && options.ucx !== null, 'ucx', 'must be an object');
      for (const key of ['transports', 'devices'] as const)
        check(
          options.ucx[key] === undefined || (typeof options.ucx[key] === 'string' && options.ucx[key]!.length > 0),
          `ucx.${key}`,
          'must be a non-empty string',
        );
    }
    return new Agent(options);
  }

  get closed(): boolean {
    return this.#native === null;
  }

  /** Transfers this agent started that have not settled. */
  get inFlight(): number {
    return this.#transfers.size;
  }

  /** Regions currently registered or allocated. */
  get regions(): Region[] {
    return [...this.#regions.values()];
  }

  #open(): NativeAgent {
    if (!this.#native) throw new KvwireError('ERR_CLOSED', `agent '${this.name}' is closed`);
    return this.#native;
  }

  /**
   * Allocates `bytes` of host memory through UCX (zeroed, pages touched). A same-host peer maps it
   * and moves blocks with one memcpy. `region.bytes` is the view to fill or read.
   *
   * With `memory: 'vram'`: `bytes` of GPU memory on CUDA device `device` (default 0), through the
   * CUDA driver (zeroed, rounded up to whole 2 MiB granules). It has no host view: `region.write` /
   * `region.read` copy to and from it; same-host peers reach it by path 'cuda_ipc', peers on other
   * hosts by 'am'. ERR_UNAVAILABLE, with the reason, where there
   * is no CUDA driver or device (`kvwire info` says which).
   */
  allocate(bytes: number, options: RegionOptions): Region {
    check(Number.isSafeInteger(bytes) && bytes > 0, 'bytes', `must be a positive integer, got ${bytes}`);
    const { name, access } = this.#regionOptions(options);
    check(options.hugePages === undefined, 'hugePages', "applies to register() only (allocate()'s memory is UCX shared memory, mapped by same-host peers)");
    const memory = options.memory ?? 'dram';
    check(memory === 'dram' || memory === 'vram', 'memory', `must be 'dram' or 'vram', got ${String(memory)}`);
    if (memory === 'vram') {
      const device = options.device ?? 0;
      check(Number.isSafeInteger(device) && device >= 0 && device < 2 ** 31, 'device', `must be a CUDA device ordinal (integer >= 0), got ${String(device)}`);
      return this.#add(new Region(this.#open().allocateVram(name, bytes, access, device), null, this.#io));
    }
    check(options.device === undefined, 'device', "applies to memory: 'vram' only");
    const r = this.#open().allocate(name, bytes, access);
    markAsUntransferable(r.bytes.buffer); // UCX owns this memory: it must not move to another thread
    return this.#add(new Region(r.region, r.bytes, this.#io));
  }

  #add(region: Region): Region {
    this.#regions.set(region.id, region);
    return region;
  }

  readonly #io: RegionIo = {
    write: (id, offset, bytes) => this.#open().writeRegion(id, offset, bytes),
    read: (id, offset, into) => this.#open().readRegion(id, offset, into),
  };

  /**
   * Registers existing memory: a Buffer, typed array, DataView, ArrayBuffer or SharedArrayBuffer.
   * The agent holds a reference to it until `deregister` or `close`, so it survives garbage collection.
   *
   * GPU memory another library owns is registered as `{ device, address, bytes }` (address a bigint
   * device pointer): the CUDA driver must confirm it is memory of that device and that the range lies
   * inside one allocation (ERR_INVALID_PARAM otherwise). The owner keeps it allocated until
   * `deregister`; kvwire never frees it.
   */
  register(memory: ArrayBufferView | ArrayBuffer | SharedArrayBuffer | DeviceMemory, options: RegionOptions): Region {
    if (isDeviceMemory(memory)) return this.#registerVram(memory, options);
    check(options?.memory === undefined, 'memory', "does not apply to register(): host memory is registered as a Buffer, GPU memory as { device, address, bytes }");
    check(options?.device === undefined, 'device', 'does not apply to host memory (GPU memory is registered as { device, address, bytes })');
    let view: Uint8Array;
    const isBuffer = memory instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && memory instanceof SharedArrayBuffer);
    if (!ArrayBuffer.isView(memory) && !isBuffer)
      throw new KvwireError('ERR_INVALID_PARAM', 'memory: must be a Buffer, typed array, DataView, ArrayBuffer or SharedArrayBuffer');
    try {
      view = ArrayBuffer.isView(memory) ? new Uint8Array(memory.buffer, memory.byteOffset, memory.byteLength) : new Uint8Array(memory);
    } catch {
      throw new KvwireError('ERR_INVALID_PARAM', 'memory: its ArrayBuffer is detached (transferred away)');
    }
    check(view.byteLength > 0, 'memory', 'must not be empty (or a detached ArrayBuffer)');
    const { name, access } = this.#regionOptions(options);
    check(options.hugePages === undefined || typeof options.hugePages === 'boolean', 'hugePages', `must be a boolean, got ${typeof options.hugePages}`);
    // A registered buffer must not move to another thread while UCX writes into it: transferring it
    // (postMessage, structuredClone) copies it instead, from now on.
    markAsUntransferable(view.buffer);
    const native = this.#open().register(name, view, access, options.hugePages === true);
    return this.#add(new Region(native, view, this.#io));
  }

  #registerVram(memory: DeviceMemory, options: RegionOptions): Region {
    const { name, access } = this.#regionOptions(options);
    check(options.hugePages === undefined && options.memory === undefined && options.device === undefined, 'options',
      'hugePages, memory and device do not apply to GPU memory (its device is in the first argument)');
    check(Number.isSafeInteger(memory.device) && memory.device >= 0 && memory.device < 2 ** 31, 'device',
      `must be a CUDA device ordinal (integer >= 0), got ${String(memory.device)}`);
    check(typeof memory.address === 'bigint' && memory.address > 0n && memory.address < 2n ** 64n, 'address',
      `must be a device address as a bigint in [1, 2^64), got ${typeof memory.address === 'bigint' ? memory.address : typeof memory.address}`);
    check(Number.isSafeInteger(memory.bytes) && memory.bytes > 0, 'bytes', `must be a positive integer, got ${String(memory.bytes)}`);
    check(memory.address + BigInt(memory.bytes) <= 2n ** 64n, 'bytes', 'address + bytes runs past the end of the address space');
    const native = this.#open().registerVram(name, memory.address, memory.bytes, access, memory.device);
    return this.#add(new Region(native, null, this.#io));
  }

  #regionOptions(options: RegionOptions): { name: string; access: Access } {
    check(options && typeof options === 'object', 'options', 'must be an object with a name');
    check(typeof options.name === 'string' && options.name.length > 0, 'name', 'must be a non-empty string');
    check(Buffer.byteLength(options.name) <= MAX_NAME_BYTES, 'name', `must be at most ${MAX_NAME_BYTES} bytes`);
    const access = options.access ?? 'readwrite';
    check(ACCESS.includes(access), 'access', `must be one of ${ACCESS.join(', ')}, got ${String(access)}`);
    return { name: options.name, access };
  }

  /**
   * Removes a region. Transfers already using it finish first; new ones fail with ERR_NOT_FOUND.
   * Peers learn of it when they load this agent's next metadata; same-host peers that copy into it
   * themselves (path 'cma') are told at once, and its memory stays referenced until they confirm
   * their copies ended (`health.retiredRegions`).
   */
  deregister(region: Region): void {
    check(region instanceof Region, 'region', 'must be a Region of this agent');
    if (this.#regions.get(region.id) !== region)
      throw new KvwireError('ERR_NOT_FOUND', `region '${region.name}' is not registered with agent '${this.name}'`);
    this.#open().deregister(region.id);
    this.#regions.delete(region.id);
    region.markDeregistered();
  }

  /**
   * Everything a peer needs to reach this agent: versioned binary metadata; with `secret`, sealed
   * (AES-256-GCM) so that only agents holding the secret can read or alter it.
   */
  metadata(): Uint8Array {
    const blob = this.#open().metadata();
    if (!this.#sealKey) return blob;
    const iv = randomBytes(SEAL_IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', this.#sealKey, iv).setAAD(SEAL_MAGIC);
    const body = Buffer.concat([cipher.update(blob), cipher.final()]);
    return Buffer.concat([SEAL_MAGIC, iv, body, cipher.getAuthTag()]);
  }

  /**
   * Loads a peer's metadata and connects to it. Loading a newer generation of a known peer
   * replaces it; loading a new instance of the same name drops the old one and fails its transfers.
   */
  loadPeer(metadata: Uint8Array): Peer {
    check(metadata instanceof Uint8Array, 'metadata', 'must be a Uint8Array');
    const native = this.#open().loadPeer(this.#verify(metadata));
    const peer = new Peer(
      native.name,
      native.agentId,
      native.generation,
      native.regions.map((r) => new RemoteRegion(native.name, native.agentId, r)),
    );
    this.#peers.set(peer.name, peer);
    return peer;
  }

  #verify(blob: Uint8Array): Uint8Array {
    const buf = Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength);
    const sealed = buf.length >= SEAL_MAGIC.length && buf.subarray(0, SEAL_MAGIC.length).equals(SEAL_MAGIC);
    if (!this.#sealKey) {
      if (sealed) throw new KvwireError('ERR_NOT_ALLOWED', 'metadata is sealed with a secret, and this agent has none (give it the same secret)');
      return buf;
    }
    if (!sealed) throw new KvwireError('ERR_NOT_ALLOWED', 'metadata is not sealed, and this agent (which has a secret) accepts only sealed metadata');
    const opened = buf.length >= SEAL_MAGIC.length + SEAL_IV_BYTES + SEAL_TAG_BYTES;
    try {
      if (!opened) throw new Error('too short');
      const iv = buf.subarray(SEAL_MAGIC.length, SEAL_MAGIC.length + SEAL_IV_BYTES);
      const decipher = createDecipheriv('aes-256-gcm', this.#sealKey, iv).setAAD(SEAL_MAGIC);
      decipher.setAuthTag(buf.subarray(buf.length - SEAL_TAG_BYTES));
      return Buffer.concat([decipher.update(buf.subarray(SEAL_MAGIC.length + SEAL_IV_BYTES, buf.length - SEAL_TAG_BYTES)), decipher.final()]);
    } catch {
      throw new KvwireError('ERR_NOT_ALLOWED', 'metadata does not open with this agent\'s secret (sealed with another secret, or altered)');
    }
  }

  /** The loaded peer with this name, if any. */
  peer(name: string): Peer | undefined {
    return this.#peers.get(name);
  }

  /** Drops a peer; its in-flight transfers fail with ERR_REMOTE_DISCONNECT. */
  forgetPeer(peer: string | Peer): void {
    const name = typeof peer === 'string' ? peer : peer?.name;
    check(typeof name === 'string', 'peer', 'must be a peer name or Peer');
    this.#open().forgetPeer(name);
    this.#peers.delete(name);
  }

  /** Pushes `local` into `remote` (a peer's region). One batch, one settle. */
  write(local: DescriptorList<Region>, remote: DescriptorList<RemoteRegion>, options: TransferOptions = {}): Transfer {
    return this.#post(1, local, remote, options);
  }

  /** Pulls `remote` (a peer's region) into `local`. One batch, one settle. */
  read(local: DescriptorList<Region>, remote: DescriptorList<RemoteRegion>, options: TransferOptions = {}): Transfer {
    return this.#post(0, local, remote, options);
  }

  #post(op: 0 | 1, local: DescriptorList<Region>, remote: DescriptorList<RemoteRegion>, options: TransferOptions): Transfer {
    const canceler = (id: number, timeout: boolean, why: string) => this.#native?.cancel(id, timeout, why) ?? false;
    let id = 0;
    let notify: Uint8Array | undefined;
    try {
      check(options && typeof options === 'object', 'options', 'must be an object');
      check(local instanceof DescriptorList && local.region instanceof Region, 'local', 'must be a DescriptorList of a local Region');
      check(remote instanceof DescriptorList && remote.region instanceof RemoteRegion, 'remote', "must be a DescriptorList of a peer's region");
      check(options.onComplete === undefined || typeof options.onComplete === 'function', 'onComplete', 'must be a function');
      check(
        options.deadlineMs === undefined || (Number.isFinite(options.deadlineMs) && options.deadlineMs > 0),
        'deadlineMs',
        'must be a positive number of milliseconds',
      );
      const pathIndex = PATH_NAMES.indexOf(options.path ?? 'auto');
      check(pathIndex >= 0, 'path', `must be one of ${PATH_NAMES.join(', ')}`);
      if (options.notify !== undefined) notify = notificationBytes('notify', options.notify);
      if (this.#regions.get(local.region.id) !== local.region)
        throw new KvwireError('ERR_NOT_FOUND', `local region '${local.region.name}' is not registered with agent '${this.name}'`);
      check(local.region.kind === 'vram' || local.region.bytes.byteLength === local.region.length, 'local',
        `region '${local.region.name}' lost its memory (its ArrayBuffer was detached); deregister it`);
      if (options.signal?.aborted) throw new KvwireError('ERR_CANCELED', 'aborted before the transfer started');
      const r = remote.region;
      id = this.#open().post(op, pathIndex, local.region.id, local.offsets, local.lengths, r.peer, r.peerAgentId, r.id,
        remote.offsets, remote.lengths, notify);
    } catch (err) {
      const t = new Transfer(0, canceler, options?.onComplete);
      t.settle(err instanceof KvwireError ? err : new KvwireError('ERR_INVALID_PARAM', String((err as Error)?.message ?? err)));
      return t;
    }
    const t = new Transfer(id, canceler, options.onComplete);
    this.#transfers.set(id, t);
    if (options.deadlineMs !== undefined) {
      const ms = options.deadlineMs;
      const timer = setTimeout(() => this.#native?.cancel(id, true, `deadline of ${ms} ms passed`), ms);
      timer.unref();
      t.addCleanup(() => clearTimeout(timer));
    }
    if (options.signal) {
      const signal = options.signal;
      const onAbort = () => this.#native?.cancel(id, false, 'aborted by signal');
      signal.addEventListener('abort', onAbort, { once: true });
      t.addCleanup(() => signal.removeEventListener('abort', onAbort));
    }
    return t;
  }

  #onSettled(rows: Float64Array, errors: (KvwireError | null)[]): void {
    for (let i = 0; i < errors.length; i++) {
      const row = i * SETTLED_STRIDE;
      const id = rows[row];
      const t = this.#transfers.get(id);
      if (!t) continue;
      this.#transfers.delete(id);
      const error = errors[i];
      if (error) {
        t.settle(error);
        continue;
      }
      const transferUs = rows[row + 8] / 1e3;
      const stats: TransferStats = {
        bytes: rows[row + 3],
        descriptors: rows[row + 4],
        segments: rows[row + 5],
        path: PATH_NAMES[rows[row + 6]] as TransferPath,
        postUs: rows[row + 7] / 1e3,
        transferUs,
        gbps: transferUs > 0 ? rows[row + 3] / transferUs / 1e3 : 0,
      };
      t.settle(null, stats);
    }
  }

  #onNotifications(from: string[], messages: (Buffer | string)[]): void {
    for (let i = 0; i < from.length; i++) {
      const message = messages[i];
      if (typeof message === 'string') {
        if (from[i] === '') this.emit('rebuilt', { reason: message } satisfies Rebuilt); // the agent itself
        else this.emit('disconnect', { peer: from[i], reason: message } satisfies Disconnect);
        continue;
      }
      const n: Notification = { from: from[i], message };
      this.emit('notification', n);
      if (this.#iterating > 0) {
        const w = this.#waiters.shift();
        if (w) w({ value: n, done: false });
        else this.#enqueue(n);
      }
    }
  }

  // An iterator nobody reads must not grow the process without bound: beyond MAX_QUEUED_* the
  // oldest waiting notifications are dropped (counted in `droppedNotifications`, warned once).
  #enqueue(n: Notification): void {
    this.#queue.push(n);
    this.#queuedBytes += n.message.length;
    while (this.#queue.length > MAX_QUEUED_NOTIFICATIONS || this.#queuedBytes > MAX_QUEUED_NOTIFICATION_BYTES) {
      this.#queuedBytes -= this.#queue.shift()!.message.length;
      if (this.#dropped++ === 0)
        process.emitWarning(`kvwire: agent '${this.name}' dropped notifications its iterator did not read (more than ${MAX_QUEUED_NOTIFICATIONS} or ${MAX_QUEUED_NOTIFICATION_BYTES >> 20} MiB waiting)`);
    }
  }

  /** What this agent's trust boundary refused so far (zeros once closed). */
  get security(): SecurityCounters {
    const c = this.#native?.securityCounters();
    return {
      droppedUnauthenticated: c?.droppedUnauthenticated ?? 0,
      failedHandshakes: c?.failedHandshakes ?? 0,
      refusedAddresses: c?.refusedAddresses ?? 0,
    };
  }

  /**
   * `rebuilds`: how often this agent replaced its UCX worker because a peer died while writing into
   * its shared-memory receive queue (which then delivers nothing, from anyone): see the 'rebuilt'
   * event. `receiveBlocked`: that happened and no new worker could be opened — only a new agent
   * recovers (README: Security and reliability). `retiredRegions`: deregistered regions whose memory
   * is still held because a same-host peer granted path 'cma' has not yet confirmed that its copies
   * into them ended (it is told at once, and confirms by writing into this agent's table, which no
   * other peer can do for it; none is waited for longer than 5 s, or than the 2 s close grace at
   * `close()`). `gpuKernelBatches`: VRAM<->VRAM batches moved by one launch of kvwire's copy kernel
   * (the others went as one CUDA copy per run: a single run, or a driver that cannot load the kernel).
   */
  get health(): AgentHealth {
    const c = this.#native?.securityCounters();
    return { receiveBlocked: c?.receiveBlocked ?? false, rebuilds: c?.rebuilds ?? 0, retiredRegions: c?.retiredRegions ?? 0,
      gpuKernelBatches: c?.gpuKernelBatches ?? 0, vramStagedBytes: c?.vramStagedBytes ?? 0,
      progressThreadSteps: c?.progressThreadSteps ?? 0, gpuFault: c?.gpuFault ?? null };
  }

  /**
   * What UCX does on each open connection: its own description of the endpoint — the lanes it opened
   * and, per operation and message size, the protocol it selected for the endpoint's configuration
   * (the tables `UCX_PROTO_INFO=y` logs; UCX 1.13 gives v1 thresholds, which name no lane; UCX >= 1.16
   * keeps put/get selections with the remote key, not here) — verbatim and parsed. Outbound
   * connections first, then inbound, each by peer name. An inbound connection is listed once this
   * agent has opened its own endpoint back to that peer. Empty once closed.
   */
  connections(): ConnectionInfo[] {
    return (this.#native?.connections() ?? []).map((c) => ({
      peer: c.peer, direction: c.outbound ? 'outbound' : 'inbound', text: c.text, protocols: parseEndpointInfo(c.text),
    }));
  }

  /**
   * @internal Tests only: opens a new UCX worker now, the path a blocked shared-memory receive queue
   * takes (see `health`), so that path can be tested without killing peers until one blocks it.
   */
  _rebuildTransportForTest(): void {
    this.#open().rebuildTransport();
  }

  /**
   * Notifications dropped: because `notifications()` was not read fast enough (oldest first), or,
   * natively, because more than 256 MiB of them waited for the JS thread at once.
   */
  get droppedNotifications(): number {
    this.#nativeDropped = this.#native?.securityCounters().droppedNotifications ?? this.#nativeDropped;
    return this.#dropped + this.#nativeDropped;
  }

  /** Sends a notification on its own. Resolves once it is handed to the transport. */
  async notify(peer: string | Peer, message: string | Uint8Array): Promise<void> {
    const name = typeof peer === 'string' ? peer : peer?.name;
    check(typeof name === 'string', 'peer', 'must be a peer name or Peer');
    this.#open().notify(name, notificationBytes('message', message));
  }

  /** Notifications as an async iterator; ends when the agent closes. */
  notifications(): AsyncIterableIterator<Notification> {
    this.#iterating++;
    let done = false;
    const finish = (): IteratorResult<Notification> => {
      if (!done) {
        done = true;
        this.#iterating--;
        if (this.#iterating === 0) {
          this.#queue = [];
          this.#queuedBytes = 0;
        }
      }
      return { value: undefined, done: true };
    };
    const it: AsyncIterableIterator<Notification> = {
      next: () => {
        if (done) return Promise.resolve({ value: undefined, done: true });
        const n = this.#queue.shift();
        if (n) {
          this.#queuedBytes -= n.message.length;
          return Promise.resolve({ value: n, done: false });
        }
        if (this.closed) return Promise.resolve(finish());
        return new Promise((resolve) => this.#waiters.push(resolve));
      },
      return: () => Promise.resolve(finish()),
      [Symbol.asyncIterator]() {
        return it;
      },
    };
    return it;
  }

  /** Keeps the process alive while the agent is open (the default), like a listening socket. */
  ref(): this {
    this.#native?.setRef(true);
    return this;
  }
  /** Lets the process exit while the agent is idle; in-flight transfers still hold it open. */
  unref(): this {
    this.#native?.setRef(false);
    return this;
  }

  /**
   * Settles every in-flight transfer with ERR_CANCELED at once, closes every connection, and
   * resolves when UCX has released its resources (at most ~2 s). Idempotent.
   */
  async close(): Promise<void> {
    const native = this.#native;
    if (!native) return this.#closing;
    // Closed before UCX finishes: handlers that run while it does see a closed agent.
    this.#native = null;
    if (this.#exitRef) openAgents.delete(this.#exitRef);
    this.#closing = native.close();
    for (const t of this.#transfers.values()) t.settle(new KvwireError('ERR_CANCELED', 'agent closed'));
    this.#transfers.clear();
    for (const r of this.#regions.values()) r.markDeregistered();
    this.#regions.clear();
    this.#peers.clear();
    for (const w of this.#waiters.splice(0)) w({ value: undefined, done: true });
    await this.#closing;
    this.emit('close');
  }
}

function isDeviceMemory(x: unknown): x is DeviceMemory {
  return typeof x === 'object' && x !== null && !ArrayBuffer.isView(x) && !(x instanceof ArrayBuffer) &&
    (typeof SharedArrayBuffer === 'undefined' || !(x instanceof SharedArrayBuffer)) && 'address' in x;
}
