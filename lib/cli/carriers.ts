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
  /** ucx: the size of one data message looked up in that table. */
  messageBytes?: number;
  /** ucx: why the protocol is not known (then `protocol` is "unknown"). */
  unknown?: string;
}

/** Blocks up to this size travel packed, several per message (native/backends/ucx/wire.h kPackSegmentMax) ... */
export const PACK_SEGMENT_MAX = 1 << 10;
/** ... in messages of up to this many bytes (kPackBytesMax). */
export const PACK_BYTES_MAX = 8 << 10;

export interface ConnectionView {
  peer: string;
  direction: string;
  protocols: EndpointProtocols;
}

/**
 * The carriers of one cell. `initiator`: the initiator's outbound connection to the target;
 * `target`: the target's inbound connection from the initiator (undefined where it cannot be asked,
 * e.g. a remote target). `deviceSource`: the data messages' source is VRAM (am sends it as CUDA
 * memory where UCX offers a table for that, else it is staged through host memory first).
 */
export function carriersOf(paths: string[], op: Op, block: number, deviceSource: boolean,
  initiator: ConnectionView | undefined, target: ConnectionView | undefined): Carrier[] {
  return paths.map((path): Carrier => {
    switch (path) {
      case 'direct':
        return { path, by: 'kvwire', protocol: `memcpy ${op === 'write' ? 'into' : 'out of'} the peer's region mapped with ucp_rkey_ptr` };
      case 'cma':
        return { path, by: 'kvwire', protocol: `process_vm_${op === 'write' ? 'writev' : 'readv'} on kvwire's copy threads` };
      case 'cuda_ipc':
        return { path, by: 'kvwire', protocol: "CUDA copies through the peer's VRAM opened with CUDA IPC" };
      case 'am':
        return amCarrier(op, block, deviceSource, initiator, target);
      case 'rma':
        return rmaCarrier(op, block, initiator);
      default:
        return { path, by: 'ucx', protocol: 'unknown', unknown: `path '${path}' is not one this bench knows` };
    }
  });
}

function amCarrier(op: Op, block: number, deviceSource: boolean, initiator?: ConnectionView, target?: ConnectionView): Carrier {
  // WRITE: the initiator sends each block as an active message with the reply flag on its own
  // endpoint; READ: the target sends the blocks back without it, on the endpoint it opened to the initiator.
  const side = op === 'write' ? 'initiator' : 'target';
  const conn = op === 'write' ? initiator : target;
  const messageBytes = block > PACK_SEGMENT_MAX ? block : PACK_BYTES_MAX;
  const base = { path: 'am', by: 'ucx' as const, side: side as Carrier['side'], messageBytes };
  if (!conn) return { ...base, protocol: 'unknown', unknown: `the ${side}'s connection cannot be asked (remote ${side})` };
  const p = conn.protocols;
  if (p.format === 1) {
    const r = protocolFor(p, 'am_send', messageBytes);
    return r ? { ...base, operation: 'am_send', protocol: r.protocol, lanes: p.lanes.join('+') }
      : { ...base, protocol: 'unknown', unknown: 'no am_send thresholds in the endpoint description' };
  }
  if (p.format === 2) {
    const flag = op === 'write' ? ' with reply flag' : '';
    const candidates = (deviceSource ? ['cuda', 'host'] : ['host']).map((m) => `active message by ucp_am_send*${flag} from ${m} memory`);
    for (const operation of candidates) {
      const r = protocolFor(p, operation, messageBytes);
      if (r) return { ...base, operation, protocol: r.protocol, lanes: r.lanes };
    }
    return { ...base, protocol: 'unknown', unknown: `no '${candidates[0]}' table in the endpoint description` };
  }
  return { ...base, protocol: 'unknown', unknown: 'UCX printed no protocol selection for this endpoint' };
}

function rmaCarrier(op: Op, block: number, initiator?: ConnectionView): Carrier {
  const base = { path: 'rma', by: 'ucx' as const, side: 'initiator' as const, messageBytes: block };
  if (!initiator) return { ...base, protocol: 'unknown', unknown: "the initiator's connection cannot be asked" };
  const p = initiator.protocols;
  const table = p.tables.find((t) => (p.format === 1 ? t.operation === `${op === 'write' ? 'put' : 'get'}[0]`
    : t.operation.startsWith(op === 'write' ? 'remote memory write' : 'remote memory read')));
  const r = table && protocolFor(p, table.operation, block);
  return r ? { ...base, operation: table!.operation, protocol: r.protocol, lanes: r.lanes || p.lanes.join('+') }
    : { ...base, protocol: 'unknown', unknown: `no ${op === 'write' ? 'put' : 'get'} table in the endpoint description` };
}

/** One line: "UCX (?) rendezvous zero-copy on tcp/lo" / "kvwire process_vm_writev ...". */
export function carrierText(c: Carrier): string {
  if (c.by === 'kvwire') return `${c.path}: ${c.protocol}`;
  if (c.unknown) return `${c.path}: UCX protocol unknown (${c.unknown})`;
  return `${c.path}: UCX ${c.protocol}${c.lanes ? ` on ${c.lanes}` : ''} (${c.side}'s ${c.messageBytes} B messages)`;
}
