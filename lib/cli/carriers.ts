// `kvwire bench`: what carried a cell's blocks on each path its timed batches took — the protocol
// UCX selected for the messages that carry them (read from UCX's own description of the endpoint,
// the tables UCX_PROTO_INFO=y logs), or kvwire's own copy where no UCX protocol moves the bytes.
import { protocolFor, type EndpointProtocols } from '../ucx-protocols';
import type { Op } from './bench-node';

export interface Carrier {
  /** The transfer path ('am', 'cma', 'direct', ...). */
  path: string;
  /** ucx: UCX moves the blocks as messages; kvwire: kvwire copies them itself (no UCX protocol involved). */
  by: 'ucx' | 'kvwire';
  /** ucx: the protocol UCX selected for the data messages (its words, e.g. "(?) rendezvous zero-copy"); kvwire: how it copies. */
  protocol: string;
  /** ucx: the lane(s) it runs on (e.g. "tcp/lo"); with UCX 1.13's v1 thresholds, every lane of the endpoint. */
  lanes?: string;
  /** ucx: the process that sends the data messages (the initiator for WRITE, the target for READ). */
  side?: 'initiator' | 'target';
  /** ucx: UCX's name for the operation those messages are (the table looked up). */
  operation?: string;
  /** ucx: the size of one data message looked up in that table (payload and kvwire's header). */
  messageBytes?: number;
  /** ucx: why the protocol is not known (then `protocol` is "unknown"). */
  unknown?: string;
}

// What kvwire's active messages look like (native/backends/ucx/wire.h, packed structs): blocks up to
// kPackSegmentMax travel several per message, up to kPackBytesMax of payload; UCX selects a protocol
// on the payload plus the header.
export const PACK_SEGMENT_MAX = 1 << 10;
export const PACK_BYTES_MAX = 8 << 10;
const HEADER = { write: 32, read: 12, packed: 16 }; // WriteHeader, ReadDataHeader, Packed{Write,Read}Header
const PACKED_ENTRY = 16; // PackedEntry: a packed WRITE carries one per block, before the bytes

/** The size UCX selects on for one data message of a cell (payload + header). */
export function amMessageBytes(op: Op, block: number, batch: number): number {
  if (block > PACK_SEGMENT_MAX) return block + HEADER[op];
  const per = op === 'write' ? block + PACKED_ENTRY : block;
  return HEADER.packed + Math.max(1, Math.min(batch, Math.floor(PACK_BYTES_MAX / per))) * per;
}

export interface ConnectionView {
  peer: string;
  direction: string;
  protocols: EndpointProtocols;
}

/**
 * The carriers of one cell of `batch` blocks. `initiator`: the initiator's outbound connection to the
 * target; `target`: the target's connection to the initiator — undefined where it cannot be asked,
 * with `missing` saying why. `deviceSource`: the data messages' source is VRAM (am sends blocks over
 * 1 KiB as CUDA memory where UCX has a table for that; packed ones, and all where it has none, are
 * staged through host memory first).
 */
export function carriersOf(paths: string[], op: Op, block: number, batch: number, deviceSource: boolean,
  initiator: ConnectionView | undefined, target: ConnectionView | undefined, missing: { initiator?: string; target?: string } = {}): Carrier[] {
  return paths.map((path): Carrier => {
    switch (path) {
      case 'direct':
        return { path, by: 'kvwire', protocol: `memcpy ${op === 'write' ? 'into' : 'out of'} the peer's region mapped with ucp_rkey_ptr` };
      case 'cma':
        return { path, by: 'kvwire', protocol: `process_vm_${op === 'write' ? 'writev' : 'readv'} by the initiator (on its copy threads from 1 MiB batches)` };
      case 'cuda_ipc':
        return { path, by: 'kvwire', protocol: "CUDA copies through the peer's VRAM opened with CUDA IPC" };
      case 'am':
        return amCarrier(op, block, batch, deviceSource && block > PACK_SEGMENT_MAX, initiator, target, missing);
      case 'rma':
        return rmaCarrier(op, block, initiator);
      default:
        return { path, by: 'ucx', protocol: 'unknown', unknown: `path '${path}' is not one this bench knows` };
    }
  });
}

function amCarrier(op: Op, block: number, batch: number, deviceSource: boolean, initiator: ConnectionView | undefined,
  target: ConnectionView | undefined, missing: { initiator?: string; target?: string }): Carrier {
  // WRITE: the initiator sends each block as an active message with the reply flag on its own
  // endpoint; READ: the target sends the blocks back without it, on the endpoint it opened to the initiator.
  const side = op === 'write' ? 'initiator' : 'target';
  const conn = op === 'write' ? initiator : target;
  const messageBytes = amMessageBytes(op, block, batch);
  const base = { path: 'am', by: 'ucx' as const, side: side as Carrier['side'], messageBytes };
  if (!conn) return { ...base, protocol: 'unknown', unknown: missing[side] ?? `the ${side}'s connection is not known` };
  const p = conn.protocols;
  if (p.format === 1) {
    const r = protocolFor(p, 'am_send', messageBytes);
    return r ? { ...base, operation: 'am_send', protocol: r.protocol, lanes: p.lanes.join('+') }
      : { ...base, protocol: 'unknown', unknown: 'no am_send thresholds in the endpoint description' };
  }
  if (p.format === 2) {
    // UCX names the source memory "host memory", "cuda memory" or, for a known GPU, "cuda/GPU0".
    const prefix = `active message by ucp_am_send*${op === 'write' ? ' with reply flag' : ''} from `;
    const kinds = deviceSource ? ['cuda', 'host memory'] : ['host memory'];
    for (const kind of kinds) {
      const table = p.tables.find((t) => t.operation.startsWith(prefix + kind) && (kind !== 'cuda' || /^[ /]/.test(t.operation.slice((prefix + kind).length))));
      const r = table && protocolFor(p, table.operation, messageBytes);
      if (r) return { ...base, operation: table!.operation, protocol: r.protocol, lanes: r.lanes };
    }
    return { ...base, protocol: 'unknown', unknown: `no '${prefix}${kinds[0]}' table in the endpoint description` };
  }
  return { ...base, protocol: 'unknown', unknown: 'UCX printed no protocol selection for this endpoint' };
}

function rmaCarrier(op: Op, block: number, initiator?: ConnectionView): Carrier {
  const base = { path: 'rma', by: 'ucx' as const, side: 'initiator' as const, messageBytes: block };
  const p = initiator?.protocols;
  // UCX 1.13 lists put/get thresholds per lane; later UCX keeps RMA selections with the remote key,
  // so the endpoint description does not show them.
  const table = p?.format === 1 ? p.tables.find((t) => new RegExp(`^${op === 'write' ? 'put' : 'get'}\\[\\d+\\]$`).test(t.operation)) : undefined;
  const r = table && protocolFor(p!, table.operation, block);
  return r ? { ...base, operation: table!.operation, protocol: r.protocol, lanes: p!.lanes.join('+') }
    : { ...base, protocol: 'unknown', unknown: p?.format === 2 ? 'UCX keeps RMA protocol selections with the remote key, not in the endpoint description'
      : `no ${op === 'write' ? 'put' : 'get'} thresholds in the endpoint description` };
}

/** A short cell for tables: "am: (?) rendezvous zero-copy on tcp/lo", "cma: kvwire copy", "am: unknown (why)". */
export function carrierSummary(c: Carrier): string {
  if (c.by === 'kvwire') return `${c.path}: kvwire copy`;
  return `${c.path}: ${c.unknown ? `unknown (${c.unknown})` : `${c.protocol}${c.lanes ? ` on ${c.lanes}` : ''}`}`;
}

/** One line: "UCX (?) rendezvous zero-copy on tcp/lo" / "kvwire process_vm_writev ...". */
export function carrierText(c: Carrier): string {
  if (c.by === 'kvwire') return `${c.path}: ${c.protocol}`;
  if (c.unknown) return `${c.path}: UCX protocol unknown (${c.unknown})`;
  return `${c.path}: UCX ${c.protocol}${c.lanes ? ` on ${c.lanes}` : ''} (${c.side}'s ${c.messageBytes} B messages)`;
}
