// The worker API over KvLayout: a prefill worker publishes a request's blocks (KvSender) and learns
// when every reader is done; a decode worker pulls them into its own blocks (KvReceiver), whole or
// layer by layer as prefill computes them. Control messages ride on kvwire notifications.
import type { Agent, Disconnect, Notification } from '../agent';
import { check, KvwireError } from '../errors';
import { copyRuns, type Peer, type Region } from '../memory';
import type { TransferStats } from '../transfer';
import { KvLayout } from './layout';

const PREFIX = 'kvwire.kv:';

type Control =
  | { t: 'subscribe'; req: string }
  // A pull started: the reader is working on the request until it says done or abort (or goes away).
  | { t: 'reading'; req: string }
  | { t: 'layer'; req: string; layer: number }
  | { t: 'done'; req: string }
  | { t: 'abort'; req: string; reason: string }
  // Staging for NHD blocks across TP: the source gathers a head slice of every token into one run.
  | { t: 'stage'; req: string; id: number; heads: [number, number]; blocks: number[]; layers: [number, number] }
  | { t: 'staged'; req: string; id: number; offset?: number; length?: number; error?: string }
  | { t: 'unstage'; req: string; id: number };

/**
 * The head slices [lo, hi) of `blocks` in `layers`, in order, as runs of `layout`'s pool, and where
 * each lands when they are packed back to back from `packedAt`.
 */
function headSliceRuns(layout: KvLayout, blocks: ArrayLike<number>, layers: [number, number], lo: number, hi: number, packedAt: number) {
  const offsets: number[] = [];
  const lengths: number[] = [];
  const packed: number[] = [];
  let cursor = packedAt;
  layout.forEachHeadSlice(blocks, layers, lo, hi, (offset, n) => {
    offsets.push(offset);
    lengths.push(n);
    packed.push(cursor);
    cursor += n;
  });
  return { offsets: Float64Array.from(offsets), lengths: Float64Array.from(lengths), packed: Float64Array.from(packed), bytes: cursor - packedAt };
}

/** The region a KvSender gathers head slices into; peers read it like any region. */
export const STAGING_REGION = 'kv-staging';

/**
 * The name a KvReceiver (and the router) looks the prefill's pool up by, unless
 * `PullRequest.sourceRegion` names another: register or allocate the prefill pool under this name.
 */
export const POOL_REGION = 'kv';

function encode(msg: Control): string {
  return PREFIX + JSON.stringify(msg);
}

function decode(n: Notification): Control | null {
  const text = n.message.toString('utf8');
  if (!text.startsWith(PREFIX)) return null;
  try {
    const msg = JSON.parse(text.slice(PREFIX.length)) as Control;
    return msg && typeof msg.req === 'string' && typeof msg.t === 'string' ? msg : null;
  } catch {
    return null; // not ours, or malformed: ignored, never thrown from an event handler
  }
}

export interface PublishOptions {
  /** Decode workers that will read the blocks; the publication completes when each said done. */
  readers?: number;
  /** Give up (ERR_TIMEOUT) if the readers are not all done in this many ms; readers are told to abort. */
  leaseMs?: number;
  /** Layers already in the blocks; by default all of them. Stream the rest with `layerReady`. */
  layersReady?: number;
}

/** One published request on the prefill side. Await it for the names of the readers that finished. */
export class KvPublication implements PromiseLike<string[]> {
  readonly #promise: Promise<string[]>;
  #resolve!: (readers: string[]) => void;
  #reject!: (e: KvwireError) => void;
  #settled = false;
  readonly done: string[] = [];
  readonly subscribers = new Set<string>();
  /** Readers that started (subscribe or pull) and have neither finished nor stopped. */
  readonly #working = new Set<string>();
  /** Readers that stopped early, and why. */
  readonly #stopped = new Map<string, string>();
  layersReady: number;
  #timer: NodeJS.Timeout | undefined;

  /** @internal */
  constructor(
    readonly requestId: string,
    readonly blocks: readonly number[],
    readonly readers: number,
    layersReady: number,
    leaseMs: number,
    private readonly sender: KvSender,
  ) {
    this.layersReady = layersReady;
    this.#promise = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.#promise.catch(() => {}); // a caller that only awaits later must not crash the process meanwhile
    this.#timer = setTimeout(() => this.abort(`lease of ${leaseMs} ms expired`, 'ERR_TIMEOUT'), leaseMs);
    this.#timer.unref();
  }

  get settled(): boolean {
    return this.#settled;
  }

  then<A = string[], B = never>(
    onFulfilled?: ((v: string[]) => A | PromiseLike<A>) | null,
    onRejected?: ((e: KvwireError) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    return this.#promise.then(onFulfilled, onRejected);
  }

  /** Layer `layer` is now in the blocks: subscribed readers may pull it. Layers must be announced in order. */
  async layerReady(layer: number): Promise<void> {
    check(Number.isSafeInteger(layer) && layer === this.layersReady, 'layer', `expected layer ${this.layersReady} next, got ${layer}`);
    this.layersReady = layer + 1;
    await Promise.all([...this.subscribers].map((r) => this.sender.send(r, { t: 'layer', req: this.requestId, layer })));
  }

  /** Ends the publication (ERR_CANCELED, or `code`) and tells every subscribed reader to stop. */
  abort(reason = 'aborted by prefill', code: 'ERR_CANCELED' | 'ERR_TIMEOUT' = 'ERR_CANCELED'): void {
    if (this.#settled) return;
    for (const r of new Set([...this.subscribers, ...this.#working]))
      this.sender.send(r, { t: 'abort', req: this.requestId, reason }).catch(() => {});
    this.#finish(new KvwireError(code, `request '${this.requestId}': ${reason}`));
  }

  /** @internal */
  readerStarted(from: string): void {
    if (this.#settled || this.done.includes(from)) return;
    this.#stopped.delete(from); // a reader may start again after its own abort while the publication is open
    this.#working.add(from);
  }

  /** @internal */
  isReader(from: string): boolean {
    return this.#working.has(from) || this.subscribers.has(from);
  }

  /** @internal */
  readerDone(from: string): void {
    if (this.#settled || this.done.includes(from)) return;
    this.#working.delete(from);
    this.done.push(from);
    if (this.done.length >= this.readers) this.#finish(null);
    else this.#endIfStopped();
  }

  /**
   * A reader gave up (abort, error, iterator closed, disconnect). The publication ends with
   * ERR_CANCELED naming it as soon as no other reader is still working, so its blocks can be freed.
   * @internal
   */
  readerStopped(from: string, why: string): void {
    if (this.#settled || this.done.includes(from)) return;
    this.#working.delete(from);
    this.subscribers.delete(from);
    this.#stopped.set(from, why);
    this.#endIfStopped();
  }

  #endIfStopped(): void {
    if (this.#settled || this.#stopped.size === 0 || this.#working.size > 0) return;
    const who = [...this.#stopped].map(([r, why]) => `reader '${r}' ${why}`).join('; ');
    this.#finish(new KvwireError('ERR_CANCELED', `request '${this.requestId}': ${who}`));
  }

  #finish(error: KvwireError | null): void {
    this.#settled = true;
    clearTimeout(this.#timer);
    this.sender.forget(this.requestId, error?.message ?? `request '${this.requestId}' completed`);
    if (error) this.#reject(error);
    else this.#resolve(this.done);
  }
}

/** What both sides share: an agent, this worker's layout and pool, and the control-message listener. */
abstract class KvEndpoint {
  readonly #onNotification = (n: Notification) => {
    const msg = decode(n);
    if (msg) this.handle(n.from, msg);
  };
  readonly #onDisconnect = (d: Disconnect) => this.peerLost(d.peer, d.reason);
  readonly #onAgentClose = () => this.close();

  constructor(
    readonly agent: Agent,
    readonly layout: KvLayout,
    readonly pool: Region,
  ) {
    check(pool.length >= layout.regionBytes, 'pool', `has ${pool.length} bytes; the layout needs ${layout.regionBytes}`);
    agent.on('notification', this.#onNotification);
    agent.on('disconnect', this.#onDisconnect);
    agent.on('close', this.#onAgentClose); // its reads and publications end with the agent
  }

  /** Stops listening for control messages. */
  close(): void {
    this.agent.off('notification', this.#onNotification);
    this.agent.off('disconnect', this.#onDisconnect);
    this.agent.off('close', this.#onAgentClose);
  }

  protected abstract handle(from: string, msg: Control): void;
  /** The connection with `peer` ended: it closed, its process exited, or UCX lost it. */
  protected abstract peerLost(peer: string, reason: string): void;
}

export interface KvSenderOptions {
  /**
   * Bytes of a staging region (0: none). With NHD blocks and a reader of another TP size, a pull is
   * one tiny run per token; the sender then gathers the reader's heads into one run here instead.
   */
  stagingBytes?: number;
}

/**
 * A reader's message can overtake the publish it refers to (the reader heard of the request on
 * another channel, pulled, and said done before `publish` ran here). Such messages wait this long
 * for their publication, at most EARLY_MAX request ids at a time (oldest dropped first).
 */
const EARLY_TTL_MS = 10_000;
const EARLY_MAX = 1024;

/** Keeps at most EARLY_MAX entries younger than EARLY_TTL_MS (a Map iterates oldest first). */
function pruneOld<V extends { at: number }>(map: Map<string, V>, now: number): void {
  for (const [id, e] of map) {
    if (now - e.at <= EARLY_TTL_MS && map.size < EARLY_MAX) break;
    map.delete(id);
  }
}

/** Prefill side: publishes requests' blocks of its pool and hears when readers are done with them. */
export class KvSender extends KvEndpoint {
  #publications = new Map<string, KvPublication>();
  #early = new Map<string, { at: number; messages: [string, Control][] }>();
  // Requests that ended recently, and how: a reader that starts one late is told to abort at once.
  #ended = new Map<string, { at: number; why: string }>();
  readonly #staging: Region | null;
  #staged = new Map<string, [number, number]>(); // `${reader}/${id}` -> [offset, length] in staging

  constructor(agent: Agent, layout: KvLayout, pool: Region, options: KvSenderOptions = {}) {
    super(agent, layout, pool);
    const bytes = options.stagingBytes ?? 0;
    check(Number.isSafeInteger(bytes) && bytes >= 0, 'stagingBytes', 'must be a non-negative integer');
    check(bytes === 0 || pool.kind !== 'vram', 'stagingBytes',
      'staging gathers heads on the host and this pool is VRAM: leave it 0 (readers then read run by run)');
    this.#staging = bytes > 0 ? agent.allocate(bytes, { name: STAGING_REGION, access: 'read' }) : null;
  }

  /** Makes `blocks` of request `requestId` readable until every reader is done, the lease ends, or abort. */
  publish(requestId: string, blocks: readonly number[], options: PublishOptions = {}): KvPublication {
    check(typeof requestId === 'string' && requestId.length > 0, 'requestId', 'must be a non-empty string');
    check(!this.#publications.has(requestId), 'requestId', `'${requestId}' is already published`);
    this.layout.descriptorsFor(blocks); // validates the block ids
    const readers = options.readers ?? 1;
    const leaseMs = options.leaseMs ?? 30_000;
    const layersReady = options.layersReady ?? this.layout.layers;
    check(Number.isSafeInteger(readers) && readers > 0, 'readers', 'must be a positive integer');
    check(Number.isFinite(leaseMs) && leaseMs > 0, 'leaseMs', 'must be a positive number');
    check(Number.isSafeInteger(layersReady) && layersReady >= 0 && layersReady <= this.layout.layers, 'layersReady', `must be in 0..${this.layout.layers}`);
    const pub = new KvPublication(requestId, [...blocks], readers, layersReady, leaseMs, this);
    this.#publications.set(requestId, pub);
    this.#ended.delete(requestId);
    const early = this.#early.get(requestId);
    this.#early.delete(requestId);
    if (early && performance.now() - early.at <= EARLY_TTL_MS) for (const [from, msg] of early.messages) this.handle(from, msg);
    return pub;
  }

  /** Stops listening; open publications are aborted. */
  close(): void {
    for (const p of [...this.#publications.values()]) p.abort('sender closed');
    super.close();
  }

  // Gathers the reader's heads of every token of the request's blocks into one free run of staging.
  #stage(from: string, msg: Extract<Control, { t: 'stage' }>, pub: KvPublication | undefined): Control {
    const reply = (extra: object): Control => ({ t: 'staged', req: msg.req, id: msg.id, ...extra });
    if (!pub) return reply({ error: `request '${msg.req}' is not published` });
    if (!this.#staging) return reply({ error: 'this sender has no staging region' });
    try {
      const runs = headSliceRuns(this.layout, msg.blocks, msg.layers, msg.heads[0], msg.heads[1], 0);
      const length = runs.bytes;
      const offset = this.#allocateStaging(length);
      if (offset < 0) return reply({ error: `staging full (${length} bytes needed)` });
      // One native call gathers every slice (validated first: a bad list copies nothing).
      copyRuns(this.#staging.bytes, runs.packed.map((x) => x + offset), this.pool.bytes, runs.offsets, runs.lengths);
      this.#staged.set(`${from}/${msg.id}`, [offset, length]);
      return reply({ offset, length });
    } catch (e) {
      return reply({ error: (e as Error).message });
    }
  }

  // First fit among the runs handed out and not yet returned.
  #allocateStaging(length: number): number {
    const used = [...this.#staged.values()].sort((a, b) => a[0] - b[0]);
    let start = 0;
    for (const [o, n] of used) {
      if (o - start >= length) break;
      start = Math.max(start, o + n);
    }
    return start + length <= this.#staging!.length ? start : -1;
  }

  /** @internal */
  send(peer: string, msg: Control): Promise<void> {
    return this.agent.notify(peer, encode(msg));
  }

  /** @internal */
  forget(requestId: string, why: string): void {
    this.#publications.delete(requestId);
    const now = performance.now();
    pruneOld(this.#ended, now);
    this.#ended.set(requestId, { at: now, why });
  }

  #keepEarly(from: string, msg: Control): void {
    const now = performance.now();
    pruneOld(this.#early, now);
    const entry = this.#early.get(msg.req) ?? { at: now, messages: [] };
    if (entry.messages.length < 64) entry.messages.push([from, msg]);
    this.#early.set(msg.req, entry);
  }

  protected peerLost(peer: string, reason: string): void {
    for (const key of [...this.#staged.keys()]) if (key.startsWith(`${peer}/`)) this.#staged.delete(key);
    for (const [id, e] of [...this.#early]) {
      e.messages = e.messages.filter(([from]) => from !== peer); // a gone reader's early 'reading' must not hold a publication
      if (e.messages.length === 0) this.#early.delete(id);
    }
    for (const pub of [...this.#publications.values()])
      if (pub.isReader(peer)) pub.readerStopped(peer, `disconnected (${reason})`);
  }

  protected handle(from: string, msg: Control): void {
    if (msg.t === 'unstage') {
      this.#staged.delete(`${from}/${msg.id}`);
      return;
    }
    const pub = this.#publications.get(msg.req);
    if (msg.t === 'stage') {
      this.send(from, this.#stage(from, msg, pub)).catch(() => {});
      return;
    }
    if (!pub) {
      const ended = this.#ended.get(msg.req);
      if (ended && performance.now() - ended.at <= EARLY_TTL_MS) {
        // A reader starting a request that is over: its blocks may already hold another request.
        if (msg.t === 'reading' || msg.t === 'subscribe')
          this.send(from, { t: 'abort', req: msg.req, reason: `the request already ended (${ended.why})` }).catch(() => {});
        return;
      }
      if (msg.t === 'done' || msg.t === 'abort' || msg.t === 'subscribe' || msg.t === 'reading') this.#keepEarly(from, msg);
      return;
    }
    if (msg.t === 'done') pub.readerDone(from);
    else if (msg.t === 'abort') pub.readerStopped(from, `aborted: ${msg.reason}`);
    else if (msg.t === 'reading') pub.readerStarted(from);
    else if (msg.t === 'subscribe') {
      pub.readerStarted(from);
      pub.subscribers.add(from);
      // Tell the new reader about every layer that is already in place.
      for (let layer = 0; layer < pub.layersReady; layer++) this.send(from, { t: 'layer', req: msg.req, layer }).catch(() => {});
    }
  }
}

export interface PullRequest {
  requestId: string;
  /** The prefill peers, indexed by their TP rank. */
  sources: readonly Peer[];
  /** The name of the prefill pool region on each source (default {@link POOL_REGION}, 'kv'). */
  sourceRegion?: string;
  /** The layout of any one prefill rank. */
  sourceLayout: KvLayout;
  sourceBlocks: readonly number[];
  destinationBlocks: readonly number[];
  deadlineMs?: number;
  signal?: AbortSignal;
}

export interface PullResult {
  bytes: number;
  transfers: number;
  stats: TransferStats[];
}

type Landing = { region: Region; buffer: Buffer; busy: boolean };

/** How long a staged pull without a deadline waits for the source to gather its run. */
const STAGE_REPLY_MS = 30_000;

/** One pull or stream in progress on a receiver. */
interface ActiveRead {
  req: string;
  sources: readonly Peer[];
  sourceNames: Set<string>;
  /** Layers announced by sources (streams only), in arrival order. */
  layers: number[];
  wake: (() => void) | null;
  /** Why the read stops early, once it does (every source but the one that caused it is told). */
  stopped: string | null;
  /** Cancels this read's transfers and staging waits. */
  controller: AbortController;
  /** The listener on the caller's AbortSignal. */
  onAbort?: () => void;
}

/** Decode side: pulls requests' blocks from prefill workers into its own pool blocks. */
export class KvReceiver extends KvEndpoint {
  #active = new Set<ActiveRead>();
  #replies = new Map<number, { source: string; resolve: (msg: Extract<Control, { t: 'staged' }> | null) => void }>();
  #nextId = 1;
  // Landing buffers for staged pulls, registered once and reused (registering and faulting in a
  // fresh 16 MiB buffer per pull cost more than the read itself). Peers may only read them.
  #landing: Landing[] = [];
  #closed = false;

  /**
   * Pulls every layer of the request's blocks, then tells each source it is done (they may free).
   * It does not wait for layers prefill has not announced: use `stream()` for a request still being
   * computed. If the pull fails or is aborted, each source is told at once (its publication ends
   * ERR_CANCELED unless another reader is still working); if a source aborts the request (lease
   * expired, prefill aborted, the request already ended) the pull rejects ERR_CANCELED saying so.
   */
  async pull(rq: PullRequest): Promise<PullResult> {
    const read = this.#begin(rq);
    try {
      await this.#tell(rq.sources, { t: 'reading', req: rq.requestId });
      const result = await this.#pullLayers(rq, read, [0, this.layout.layers]);
      this.#throwIfStopped(rq, read);
      await this.#tell(rq.sources, { t: 'done', req: rq.requestId });
      return result;
    } catch (err) {
      throw this.#fail(rq, read, err);
    } finally {
      this.#end(rq, read);
    }
  }

  /**
   * Layer streaming: subscribes to the request and pulls each layer as prefill announces it,
   * yielding the layer index once its bytes are in place. Sends 'done' after the last layer.
   * Leaving the loop early (`break`, `return`, an exception in its body) or an error tells every
   * source that this reader stopped.
   */
  async *stream(rq: PullRequest): AsyncGenerator<{ layer: number; bytes: number }> {
    const read = this.#begin(rq);
    let finished = false;
    try {
      await this.#tell(rq.sources, { t: 'subscribe', req: rq.requestId });
      const seen = new Map<number, number>(); // layer -> sources that announced it
      for (let next = 0; next < this.layout.layers; ) {
        while (read.layers.length === 0 && !read.stopped) await new Promise<void>((resolve) => (read.wake = resolve));
        this.#throwIfStopped(rq, read);
        const layer = read.layers.shift()!;
        seen.set(layer, (seen.get(layer) ?? 0) + 1);
        // A layer is ready when every source rank announced it.
        while (next < this.layout.layers && (seen.get(next) ?? 0) >= rq.sources.length) {
          const r = await this.#pullLayers(rq, read, [next, next + 1]);
          this.#throwIfStopped(rq, read);
          yield { layer: next, bytes: r.bytes };
          next++;
        }
      }
      await this.#tell(rq.sources, { t: 'done', req: rq.requestId });
      finished = true;
    } catch (err) {
      finished = true;
      throw this.#fail(rq, read, err);
    } finally {
      // Still unfinished here: the consumer left the loop (break/return/throw in its body).
      if (!finished) this.#stop(read, 'the reader stopped iterating', null);
      this.#end(rq, read);
    }
  }

  #begin(rq: PullRequest): ActiveRead {
    check(rq && typeof rq === 'object', 'request', 'must be an object');
    check(typeof rq.requestId === 'string' && rq.requestId.length > 0, 'requestId', 'must be a non-empty string');
    check(Array.isArray(rq.sources) && rq.sources.length > 0, 'sources', 'must list the prefill peers, one per TP rank');
    const refused = this.#closed ? 'this KvReceiver is closed' : rq.signal?.aborted ? 'aborted before the pull started' : null;
    if (refused) {
      // The prefill may be holding the blocks for this reader: tell it at once (best effort).
      this.#abortSources(rq.requestId, rq.sources, refused, null);
      throw new KvwireError(this.#closed ? 'ERR_CLOSED' : 'ERR_CANCELED', `request '${rq.requestId}': ${refused}`);
    }
    const read: ActiveRead = {
      req: rq.requestId,
      sources: [...rq.sources],
      sourceNames: new Set(rq.sources.map((s) => s.name)),
      layers: [],
      wake: null,
      stopped: null,
      controller: new AbortController(),
    };
    this.#active.add(read);
    rq.signal?.addEventListener('abort', read.onAbort = () => this.#stop(read, 'aborted by its signal', null), { once: true });
    return read;
  }

  #end(rq: PullRequest, read: ActiveRead): void {
    if (read.onAbort) rq.signal?.removeEventListener('abort', read.onAbort);
    this.#active.delete(read);
  }

  #abortSources(req: string, sources: readonly Peer[], reason: string, except: string | null): void {
    for (const s of sources) if (s.name !== except) this.agent.notify(s, encode({ t: 'abort', req, reason })).catch(() => {});
  }

  /**
   * Stops a read early, once: its transfers are canceled, a waiting stream wakes, and every source
   * except `bySource` (the one that stopped it, if any) is told at once that this reader gave up.
   */
  #stop(read: ActiveRead, why: string, bySource: string | null): void {
    if (read.stopped) return;
    read.stopped = why;
    read.controller.abort();
    this.#abortSources(read.req, read.sources, why, bySource);
    const wake = read.wake;
    read.wake = null;
    wake?.();
  }

  #throwIfStopped(rq: PullRequest, read: ActiveRead): void {
    if (read.stopped) throw new KvwireError('ERR_CANCELED', `request '${rq.requestId}': ${read.stopped}`);
  }

  /** The error a failed read rejects with: why it was stopped, if it was; else `err`, after stopping it. */
  #fail(rq: PullRequest, read: ActiveRead, err: unknown): unknown {
    if (read.stopped) return new KvwireError('ERR_CANCELED', `request '${rq.requestId}': ${read.stopped}`);
    this.#stop(read, String((err as Error)?.message ?? err), null);
    return err;
  }

  async #tell(sources: readonly Peer[], msg: Control): Promise<void> {
    await Promise.all(sources.map((s) => this.agent.notify(s, encode(msg))));
  }

  async #pullLayers(rq: PullRequest, read: ActiveRead, layers: [number, number]): Promise<PullResult> {
    check(rq.sources.length === rq.sourceLayout.tpSize, 'sources', `need one peer per prefill rank (${rq.sourceLayout.tpSize}), got ${rq.sources.length}`);
    const plans = this.layout.planPull(rq.sourceLayout, rq.sourceBlocks, rq.destinationBlocks, layers);
    // NHD blocks across TP sizes are one run per token; a source with a staging region gathers them
    // (into host memory here, scattered by the CPU: not for a VRAM pool, read run by run).
    const staged = this.layout.blockLayout === 'NHD' && rq.sourceLayout.tpSize !== this.layout.tpSize && this.pool.kind !== 'vram';
    const regionName = rq.sourceRegion ?? POOL_REGION;
    const stats = await Promise.all(
      plans.map(async (plan) => {
        const source = rq.sources[plan.sourceRank];
        if (staged && source.regions.some((r) => r.name === STAGING_REGION)) {
          const s = await this.#pullStaged(rq, read, source, plan.sourceRank, layers);
          if (s) return s;
        }
        return this.agent.read(
          this.pool.descriptors(plan.destinationOffsets, plan.lengths),
          sourcePool(source, regionName, rq.sourceRegion !== undefined).descriptors(plan.sourceOffsets, plan.lengths),
          { deadlineMs: rq.deadlineMs, signal: read.controller.signal },
        );
      }),
    );
    return { bytes: stats.reduce((a, s) => a + s.bytes, 0), transfers: stats.length, stats };
  }

  // Asks the source to gather our heads into its staging region, reads that one run, and scatters
  // it into our blocks. Returns null (the caller pulls run by run) if the source cannot stage.
  async #pullStaged(rq: PullRequest, read: ActiveRead, source: Peer, rank: number, layers: [number, number]): Promise<TransferStats | null> {
    const [lo, hi] = this.layout.sharedHeads(rq.sourceLayout, rank);
    const id = this.#nextId++;
    // The reply may never come (the source went away, or will not answer): the read stopping, the
    // source disconnecting and the pull's deadline (30 s without one) each end the wait.
    const waitMs = rq.deadlineMs ?? STAGE_REPLY_MS;
    let timedOut = false;
    const reply = new Promise<Extract<Control, { t: 'staged' }> | null>((resolve) => this.#replies.set(id, { source: source.name, resolve }));
    const onStop = () => this.#replies.get(id)?.resolve(null);
    const timer = setTimeout(() => ((timedOut = true), onStop()), waitMs);
    read.controller.signal.addEventListener('abort', onStop, { once: true });
    let staged: Extract<Control, { t: 'staged' }> | null;
    try {
      await this.agent.notify(source, encode({ t: 'stage', req: rq.requestId, id, heads: [lo, hi], blocks: [...rq.sourceBlocks], layers }));
      staged = await reply;
    } finally {
      clearTimeout(timer);
      read.controller.signal.removeEventListener('abort', onStop);
      this.#replies.delete(id);
    }
    this.#throwIfStopped(rq, read);
    if (timedOut) throw new KvwireError('ERR_TIMEOUT', `request '${rq.requestId}': source '${source.name}' did not answer the staging request in ${waitMs} ms`);
    if (!staged || staged.error || staged.offset === undefined || staged.length === undefined) return null;
    const landing = this.#takeLanding(staged.length);
    const buffer = landing.buffer;
    try {
      const stats = await this.agent.read(
        landing.region.descriptors([0], [staged.length]),
        source.region(STAGING_REGION).descriptors([staged.offset], [staged.length]),
        { deadlineMs: rq.deadlineMs, signal: read.controller.signal },
      );
      const runs = headSliceRuns(this.layout, rq.destinationBlocks, layers, lo, hi, 0);
      copyRuns(this.pool.bytes, runs.offsets, buffer, runs.packed, runs.lengths);
      return stats;
    } finally {
      this.#returnLanding(landing);
      this.agent.notify(source, encode({ t: 'unstage', req: rq.requestId, id })).catch(() => {});
    }
  }

  #takeLanding(length: number): Landing {
    let landing = this.#landing.find((l) => !l.busy && l.buffer.length >= length);
    if (!landing) {
      const buffer = Buffer.alloc(length);
      landing = { buffer, busy: false, region: this.agent.register(buffer, { name: `kv-stage-in-${this.#nextId++}`, access: 'read' }) };
      this.#landing.push(landing);
    }
    landing.busy = true;
    return landing;
  }

  // Keeps at most two idle landing buffers (the largest); none once the receiver is closed.
  #returnLanding(landing: Landing): void {
    landing.busy = false;
    const idle = this.#landing.filter((l) => !l.busy).sort((a, b) => b.buffer.length - a.buffer.length);
    for (const l of idle.slice(this.#closed ? 0 : 2)) {
      this.#landing.splice(this.#landing.indexOf(l), 1);
      if (l.region.live && !this.agent.closed) this.agent.deregister(l.region);
    }
  }

  /**
   * Stops listening for control messages and releases the staging landing buffers not in use.
   * Pulls and streams still running reject ERR_CANCELED, and their sources are told.
   */
  close(): void {
    this.#closed = true;
    for (const read of [...this.#active]) this.#stop(read, 'the receiver was closed', null);
    for (const l of this.#landing.filter((x) => !x.busy)) this.#returnLanding(l);
    super.close();
  }

  protected peerLost(peer: string, reason: string): void {
    for (const [, r] of this.#replies) if (r.source === peer) r.resolve(null);
    for (const read of [...this.#active])
      if (read.sourceNames.has(peer)) this.#stop(read, `source '${peer}' disconnected (${reason})`, peer);
  }

  protected handle(from: string, msg: Control): void {
    if (msg.t === 'staged') {
      const r = this.#replies.get(msg.id);
      if (r && r.source === from) r.resolve(msg); // only the source asked may answer
      return;
    }
    for (const read of this.#active) {
      if (read.req !== msg.req || !read.sourceNames.has(from)) continue;
      if (msg.t === 'layer' && Number.isSafeInteger(msg.layer)) {
        read.layers.push(msg.layer);
        const wake = read.wake;
        read.wake = null;
        wake?.();
      } else if (msg.t === 'abort') {
        this.#stop(read, `aborted by '${from}': ${msg.reason}`, from);
      }
    }
  }
}

/** The source's pool region, with an error that says which name was looked for and why. */
function sourcePool(source: Peer, name: string, named: boolean): ReturnType<Peer['region']> {
  if (source.regions.some((r) => r.name === name)) return source.region(name);
  throw new KvwireError(
    'ERR_NOT_FOUND',
    `peer '${source.name}' publishes no region '${name}'` +
      (named ? '' : ` (KvReceiver pulls from the prefill pool region named '${POOL_REGION}' unless PullRequest.sourceRegion names another)`) +
      `; it publishes: ${source.regions.map((r) => `'${r.name}'`).join(', ') || 'none'}`,
  );
}
