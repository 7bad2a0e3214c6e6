import { KvwireError } from './errors';

export type TransferPath = 'direct' | 'am' | 'rma' | 'cma' | 'cuda_ipc';
export const PATH_NAMES: readonly (TransferPath | 'auto')[] = ['auto', 'direct', 'am', 'rma', 'cma', 'cuda_ipc'];

/** What a settled transfer reports. */
export interface TransferStats {
  /** Bytes moved. */
  bytes: number;
  /** Descriptors in the batch, as the caller gave them. */
  descriptors: number;
  /** Runs after coalescing adjacent descriptors (what went on the wire). */
  segments: number;
  /**
   * How the bytes moved: 'direct' (peer memory mapped here, memcpy), 'cma' (a same-host peer's
   * registered memory, copied by this process with process_vm_readv/writev), 'am' (active-message
   * rendezvous, served by the peer; VRAM too, on any host), 'rma', or 'cuda_ipc' (VRAM on either
   * side, same host: the peer's VRAM opened through CUDA IPC, copied by this process on its own CUDA
   * stream).
   */
  path: TransferPath;
  /** Validate + plan + post, microseconds. */
  postUs: number;
  /** Post to settle, microseconds. */
  transferUs: number;
  /** bytes / transferUs, in GB/s (1e9 bytes per second). */
  gbps: number;
}

export type TransferState = 'pending' | 'done' | 'failed';

export interface TransferOptions {
  /** Sent to the peer after the data is in place (WRITE) or after it was read (READ). */
  notify?: string | Uint8Array;
  /** Settle with ERR_TIMEOUT if the transfer has not finished after this many milliseconds. */
  deadlineMs?: number;
  /** Aborting settles the transfer with ERR_CANCELED. */
  signal?: AbortSignal;
  /** Called once when the transfer settles, in addition to the promise. */
  onComplete?: (error: KvwireError | null, stats?: TransferStats) => void;
  /** Force a path instead of letting kvwire choose per peer and region. */
  path?: 'auto' | TransferPath;
}

/**
 * One batch in flight. Await it (it is a PromiseLike) for its stats; it settles exactly once:
 * resolved, or rejected with ERR_REMOTE_DISCONNECT, ERR_TIMEOUT, ERR_CANCELED or a validation error.
 */
export class Transfer implements PromiseLike<TransferStats> {
  #state: TransferState = 'pending';
  #error: KvwireError | null = null;
  #stats: TransferStats | undefined;
  #promise: Promise<TransferStats> | undefined;
  #resolve?: (s: TransferStats) => void;
  #reject?: (e: KvwireError) => void;
  #cleanup: (() => void)[] = [];

  /** @internal */
  constructor(
    /** Agent-unique id (0 when the transfer failed before it was posted). */
    readonly id: number,
    private readonly canceler: (id: number, timeout: boolean, why: string) => boolean,
    private readonly onComplete?: TransferOptions['onComplete'],
  ) {}

  get status(): TransferState {
    return this.#state;
  }
  /** The error a failed transfer settled with. */
  get error(): KvwireError | null {
    return this.#error;
  }
  get stats(): TransferStats | undefined {
    return this.#stats;
  }

  /** Settles the transfer with ERR_CANCELED if it has not settled yet. Returns whether it did. */
  cancel(reason = 'canceled by caller'): boolean {
    if (this.#state !== 'pending') return false;
    return this.canceler(this.id, false, reason);
  }

  then<A = TransferStats, B = never>(
    onFulfilled?: ((value: TransferStats) => A | PromiseLike<A>) | null,
    onRejected?: ((reason: KvwireError) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    return this.#lazyPromise().then(onFulfilled, onRejected);
  }
  catch<B = never>(onRejected?: ((reason: KvwireError) => B | PromiseLike<B>) | null): Promise<TransferStats | B> {
    return this.#lazyPromise().catch(onRejected);
  }
  finally(onFinally?: (() => void) | null): Promise<TransferStats> {
    return this.#lazyPromise().finally(onFinally);
  }

  // The promise is made only when someone awaits, so a callback-only caller never sees an
  // unhandled rejection.
  #lazyPromise(): Promise<TransferStats> {
    if (!this.#promise) {
      if (this.#state === 'done') this.#promise = Promise.resolve(this.#stats!);
      else if (this.#state === 'failed') this.#promise = Promise.reject(this.#error);
      else
        this.#promise = new Promise<TransferStats>((resolve, reject) => {
          this.#resolve = resolve;
          this.#reject = reject;
        });
    }
    return this.#promise;
  }

  /** @internal */
  addCleanup(fn: () => void): void {
    this.#cleanup.push(fn);
  }

  /** @internal Settles once; later calls are ignored. */
  settle(error: KvwireError | null, stats?: TransferStats): void {
    if (this.#state !== 'pending') return;
    this.#state = error ? 'failed' : 'done';
    this.#error = error;
    this.#stats = stats;
    for (const fn of this.#cleanup) fn();
    this.#cleanup = [];
    if (error) this.#reject?.(error);
    else this.#resolve?.(stats!);
    if (this.onComplete) {
      try {
        this.onComplete(error, stats);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }
}
