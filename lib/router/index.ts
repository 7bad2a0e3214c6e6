// The transport plugin a KV-aware router loads: one interface to move or prefetch a request's
// blocks between workers, estimate what a move costs, and watch health and per-pair statistics.
// Workers run a KvRouterEndpoint beside their KvReceiver; the router drives them over kvwire
// notifications, and the bytes go straight from the source worker to the destination worker.
import type { Agent, Disconnect, Notification } from '../agent';
import { check, KvwireError } from '../errors';
import { KvLayout, type KvLayoutSpec } from '../kv/layout';
import type { KvReceiver } from '../kv/worker';

/** What a router asks for: put `sourceBlocks` of `from` into `destinationBlocks` of `to`. */
export interface MoveRequest {
  requestId: string;
  /** The source worker, or its TP ranks' workers in rank order when the source has TP > 1. */
  from: string | readonly string[];
  to: string;
  sourceBlocks: readonly number[];
  destinationBlocks: readonly number[];
  /** Settle with ERR_TIMEOUT after this many ms (default 30 s). */
  deadlineMs?: number;
}

export interface MoveResult {
  requestId: string;
  bytes: number;
  /** Time the destination spent pulling, µs. */
  transferUs: number;
  /** Router-observed time from request to completion, µs. */
  totalUs: number;
}

export interface PairStats {
  moves: number;
  failures: number;
  bytes: number;
  /** Exponentially weighted bandwidth of recent moves, GB/s (1e9 bytes/s). */
  gbps: number;
  lastError?: string;
}

/** The interface a router programs against. `KvwireRouterTransport` is kvwire's implementation. */
export interface KvTransport {
  move(request: MoveRequest): Promise<MoveResult>;
  /** Expected seconds to move `bytes` from → to, from measured bandwidth (or `defaultGbps` before any move). */
  estimate(bytes: number, from: string | readonly string[], to: string): number;
  /** Workers known to the transport and whether their connection is up. */
  health(): Record<string, { connected: boolean; lastError?: string }>;
  /** Per "from->to" pair statistics ("a+b->to" for a source with several TP ranks). */
  stats(): Record<string, PairStats>;
  close(): Promise<void>;
}

const PREFIX = 'kvwire.router:';

type Command =
  | { t: 'move'; id: number; req: MoveRequest; sourceMetadata: string[]; sourceLayout: KvLayoutSpec }
  | { t: 'moved'; id: number; bytes: number; transferUs: number }
  | { t: 'failed'; id: number; code: string; message: string };

function parse(n: Notification): Command | null {
  const text = n.message.toString('utf8');
  if (!text.startsWith(PREFIX)) return null;
  try {
    const c = JSON.parse(text.slice(PREFIX.length)) as Command;
    return c && typeof c.t === 'string' && Number.isSafeInteger(c.id) ? c : null;
  } catch {
    return null;
  }
}

/**
 * Runs on a decode (destination) worker: executes the router's move commands with its KvReceiver
 * and reports the result. Source metadata arrives with the command, so workers need not know each
 * other in advance.
 */
export class KvRouterEndpoint {
  readonly #onNotification = (n: Notification) => {
    const c = parse(n);
    if (c?.t === 'move') void this.#move(n.from, c);
  };

  constructor(
    readonly agent: Agent,
    readonly receiver: KvReceiver,
  ) {
    agent.on('notification', this.#onNotification);
  }

  close(): void {
    this.agent.off('notification', this.#onNotification);
  }

  async #move(router: string, c: Extract<Command, { t: 'move' }>): Promise<void> {
    let reply: Command;
    try {
      const sources = c.sourceMetadata.map((md) => this.agent.loadPeer(Buffer.from(md, 'base64')));
      const result = await this.receiver.pull({
        requestId: c.req.requestId,
        sources,
        sourceLayout: new KvLayout(c.sourceLayout),
        sourceBlocks: c.req.sourceBlocks,
        destinationBlocks: c.req.destinationBlocks,
        deadlineMs: c.req.deadlineMs,
      });
      const transferUs = Math.max(...result.stats.map((s) => s.transferUs));
      reply = { t: 'moved', id: c.id, bytes: result.bytes, transferUs };
    } catch (err) {
      const e = err as KvwireError;
      reply = { t: 'failed', id: c.id, code: e.code ?? 'ERR_BACKEND', message: String(e.message) };
    }
    await this.agent.notify(router, PREFIX + JSON.stringify(reply)).catch(() => {});
  }
}

export interface WorkerInfo {
  /** The worker's kvwire metadata. */
  metadata: Uint8Array;
  /** Its KV layout (its own TP rank and size): a spec with `tp`, or the worker's KvLayout. */
  layout: KvLayoutSpec | KvLayout;
}

/** kvwire's KvTransport: the router's own agent sends commands; workers move the bytes. */
export class KvwireRouterTransport implements KvTransport {
  #workers = new Map<string, { metadata: Uint8Array; layout: KvLayoutSpec }>();
  #pending = new Map<number, { to: string; resolve: (r: { bytes: number; transferUs: number }) => void; reject: (e: KvwireError) => void }>();
  #stats = new Map<string, PairStats>();
  #errors = new Map<string, string>();
  #next = 1;
  readonly #onNotification = (n: Notification) => {
    const c = parse(n);
    if (!c || c.t === 'move') return;
    const p = this.#pending.get(c.id);
    if (!p) return;
    this.#pending.delete(c.id);
    if (c.t === 'moved') p.resolve(c);
    else p.reject(new KvwireError(c.code as KvwireError['code'], `worker: ${c.message}`));
  };

  // A worker whose connection ended is unhealthy until addWorker is called for it again; moves
  // waiting on it as their destination fail at once.
  readonly #onDisconnect = (d: Disconnect) => {
    if (!this.#workers.has(d.peer)) return;
    this.#errors.set(d.peer, `disconnected: ${d.reason}`);
    for (const [id, p] of this.#pending)
      if (p.to === d.peer) {
        this.#pending.delete(id);
        p.reject(new KvwireError('ERR_REMOTE_DISCONNECT', `destination worker '${d.peer}' disconnected (${d.reason})`));
      }
  };

  constructor(
    readonly agent: Agent,
    /** Bandwidth assumed for a pair before any move was measured, GB/s. */
    readonly defaultGbps = 1,
  ) {
    agent.on('notification', this.#onNotification);
    agent.on('disconnect', this.#onDisconnect);
  }

  /** Registers (or refreshes) a worker: the router connects to it. */
  addWorker(info: WorkerInfo): string {
    check(info && typeof info === 'object', 'info', 'must be { metadata, layout }');
    // Validated before connecting; kept as a plain spec (with tp) because it travels in commands.
    const layout = new KvLayout(info.layout).spec();
    const peer = this.agent.loadPeer(info.metadata);
    this.#workers.set(peer.name, { metadata: info.metadata, layout });
    this.#errors.delete(peer.name);
    return peer.name;
  }

  async move(rq: MoveRequest): Promise<MoveResult> {
    check(rq && typeof rq.requestId === 'string', 'requestId', 'must be a string');
    const from = typeof rq.from === 'string' ? [rq.from] : [...rq.from];
    const sources = from.map((name) => {
      const w = this.#workers.get(name);
      if (!w) throw new KvwireError('ERR_NOT_FOUND', `unknown source worker '${name}'`);
      return w;
    });
    sources.forEach((w, rank) =>
      check((w.layout.tp?.size ?? 1) === sources.length && (w.layout.tp?.rank ?? 0) === rank, 'from',
        `must list the source's ${w.layout.tp?.size ?? 1} TP rank(s) in rank order`),
    );
    if (!this.#workers.has(rq.to)) throw new KvwireError('ERR_NOT_FOUND', `unknown destination worker '${rq.to}'`);
    const id = this.#next++;
    const started = process.hrtime.bigint();
    const deadline = rq.deadlineMs ?? 30_000;
    const key = `${from.join('+')}->${rq.to}`;
    const stats = this.#stats.get(key) ?? { moves: 0, failures: 0, bytes: 0, gbps: 0 };
    this.#stats.set(key, stats);
    try {
      const done = await new Promise<{ bytes: number; transferUs: number }>((resolve, reject) => {
        // The worker has its own deadline; this one also covers a worker that never answers.
        const timer = setTimeout(() => {
          this.#pending.delete(id);
          reject(new KvwireError('ERR_TIMEOUT', `move '${rq.requestId}' ${key}: no answer in ${deadline + 1000} ms`));
        }, deadline + 1000);
        timer.unref();
        this.#pending.set(id, {
          to: rq.to,
          resolve: (r) => (clearTimeout(timer), resolve(r)),
          reject: (e) => (clearTimeout(timer), reject(e)),
        });
        const cmd: Command = {
          t: 'move',
          id,
          req: { ...rq, deadlineMs: deadline },
          sourceMetadata: sources.map((w) => Buffer.from(w.metadata).toString('base64')),
          sourceLayout: sources[0].layout,
        };
        this.agent.notify(rq.to, PREFIX + JSON.stringify(cmd)).catch((e: KvwireError) => {
          this.#pending.delete(id);
          clearTimeout(timer);
          reject(e);
        });
      });
      const totalUs = Number(process.hrtime.bigint() - started) / 1e3;
      const gbps = done.bytes / Math.max(done.transferUs, 1) / 1e3;
      stats.moves++;
      stats.bytes += done.bytes;
      stats.gbps = stats.gbps === 0 ? gbps : 0.8 * stats.gbps + 0.2 * gbps;
      return { requestId: rq.requestId, bytes: done.bytes, transferUs: done.transferUs, totalUs };
    } catch (err) {
      stats.failures++;
      stats.lastError = (err as Error).message;
      // A destination that dropped its connection or did not answer at all is reported unhealthy.
      const code = (err as KvwireError).code;
      if (code === 'ERR_REMOTE_DISCONNECT' || code === 'ERR_TIMEOUT') this.#errors.set(rq.to, stats.lastError);
      throw err;
    }
  }

  estimate(bytes: number, from: string | readonly string[], to: string): number {
    check(Number.isFinite(bytes) && bytes >= 0, 'bytes', 'must be a non-negative number');
    const gbps = this.#stats.get(`${typeof from === 'string' ? from : from.join('+')}->${to}`)?.gbps || this.defaultGbps;
    return bytes / (gbps * 1e9);
  }

  health(): Record<string, { connected: boolean; lastError?: string }> {
    const out: Record<string, { connected: boolean; lastError?: string }> = {};
    for (const name of this.#workers.keys()) {
      const lastError = this.#errors.get(name);
      out[name] = { connected: this.agent.peer(name) !== undefined && lastError === undefined, ...(lastError ? { lastError } : {}) };
    }
    return out;
  }

  stats(): Record<string, PairStats> {
    return Object.fromEntries([...this.#stats].map(([k, v]) => [k, { ...v }]));
  }

  async close(): Promise<void> {
    this.agent.off('notification', this.#onNotification);
    this.agent.off('disconnect', this.#onDisconnect);
    for (const p of this.#pending.values()) p.reject(new KvwireError('ERR_CANCELED', 'router transport closed'));
    this.#pending.clear();
  }
}
