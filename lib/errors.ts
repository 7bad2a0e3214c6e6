/** Every error code kvwire raises. */
export type ErrorCode =
  | 'ERR_INVALID_PARAM'
  | 'ERR_NOT_FOUND'
  | 'ERR_NOT_ALLOWED'
  | 'ERR_MISMATCH'
  | 'ERR_BACKEND'
  | 'ERR_REMOTE_DISCONNECT'
  | 'ERR_CANCELED'
  | 'ERR_TIMEOUT'
  | 'ERR_UNAVAILABLE'
  | 'ERR_CLOSED';

/**
 * The one error class kvwire throws or rejects with. `code` says what kind of failure it is;
 * `index` names the descriptor at fault when one is.
 */
export class KvwireError extends Error {
  readonly code: ErrorCode;
  readonly index?: number;
  constructor(code: ErrorCode, message: string, index?: number) {
    super(message);
    this.name = 'KvwireError';
    this.code = code;
    if (index !== undefined && index >= 0) this.index = index;
  }
}

/** Throws ERR_INVALID_PARAM naming `field` unless `ok`. */
export function check(ok: unknown, field: string, message: string, index?: number): asserts ok {
  if (!ok) throw new KvwireError('ERR_INVALID_PARAM', `${field}: ${message}`, index);
}
