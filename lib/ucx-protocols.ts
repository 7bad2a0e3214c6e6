// What UCX does on a connection, read from its own description of the endpoint (ucp_ep_print_info):
// the lanes it opened and, per operation and message size, the protocol it selected for the
// endpoint's configuration (shared by endpoints of the same configuration; an operation appears once
// UCX has selected protocols for it). UCX 1.16 and later print protocol tables (the ones UCX_PROTO_INFO=y logs; 1.16-1.21
// with a one-row title, 1.22 with a title block and a header row); UCX 1.13 prints its v1 thresholds
// (e.g. "am_send: 0..<egr/short>..93..<egr/bcopy>..8256..<rndv>..(inf)"), which name no lane. RMA
// (put/get) selections of UCX >= 1.16 live with the remote key and are not in this description.

/** One message-size range of an operation and the protocol UCX picked for it. */
export interface ProtocolRange {
  /** Smallest message size of the range, bytes. */
  from: number;
  /** Largest, bytes; null: no upper bound. */
  to: number | null;
  /** UCX's words, e.g. "zero-copy", "multi-frag copy-in", "(?) rendezvous zero-copy read from remote", "rndv". */
  protocol: string;
  /** The transport/device it runs on, e.g. "tcp/lo", "cma/memory" (empty where UCX does not say: v1). */
  lanes: string;
}

/** One operation's selection table. */
export interface ProtocolTable {
  /** UCX's name for the operation, e.g. "active message by ucp_am_send* with reply flag from host memory" (v1: "am_send"). */
  operation: string;
  ranges: ProtocolRange[];
}

export interface EndpointProtocols {
  /** The lanes the endpoint opened, as transport/device, e.g. ["sysv/memory", "cma/memory"]. */
  lanes: string[];
  tables: ProtocolTable[];
  /** 2: protocol tables (UCX >= 1.16); 1: v1 thresholds only (UCX 1.13); null: nothing recognised. */
  format: 1 | 2 | null;
}

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50, E: 2 ** 60 };

/** "8256", "256K", "4M" -> bytes; "inf" -> null; anything else -> NaN. */
function sizeOf(text: string): number | null {
  const t = text.trim();
  if (t === 'inf' || t === '(inf)') return null;
  const m = /^(\d+)([KMGTPE]?)$/i.exec(t);
  return m ? Number(m[1]) * UNITS[m[2].toUpperCase()] : NaN;
}

/** "1..16515", "256K..inf", "0" -> [from, to]; undefined if it is not a range. */
function rangeOf(text: string): [number, number | null] | undefined {
  const [a, b] = text.includes('..') ? text.split('..') : [text, text];
  const from = sizeOf(a);
  const to = sizeOf(b);
  if (from === null || Number.isNaN(from) || Number.isNaN(to as number)) return undefined;
  return [from, to];
}

/** Parses UCX's endpoint description (both formats); unknown lines are ignored. */
export function parseEndpointInfo(text: string): EndpointProtocols {
  const lanes: string[] = [];
  const tables: ProtocolTable[] = [];
  let format: 1 | 2 | null = null;
  let titles: string[] = [];
  let current: ProtocolTable | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.replace(/^#\s?/, '').trim();
    const lane = /^lane\[\d+\]:\s+\d+:(\S+?)(?:\.\d+)?\s/.exec(line);
    if (lane) {
      if (!lanes.includes(lane[1])) lanes.push(lane[1]);
      continue;
    }
    const v1 = /^([a-z_]+(?:\[\d+\])?):\s+(0\.\..*)$/.exec(line);
    if (v1) {
      // 0..<egr/short>..93..<egr/bcopy>..8256..<rndv>..(inf): a size, a protocol, a size, ...
      const parts = v1[2].split('..');
      const ranges: ProtocolRange[] = [];
      for (let i = 0; i + 2 < parts.length; i += 2) {
        const from = sizeOf(parts[i]);
        const next = sizeOf(parts[i + 2]);
        if (from === null || Number.isNaN(from) || Number.isNaN(next as number) || !/^<.+>$/.test(parts[i + 1])) break;
        ranges.push({ from, to: next === null ? null : next - 1, protocol: parts[i + 1].slice(1, -1), lanes: '' });
      }
      if (ranges.length) {
        tables.push({ operation: v1[1], ranges });
        format ??= 1;
      }
      continue;
    }
    if (line.startsWith('+')) continue; // a table border
    if (!line.startsWith('|')) {
      titles = [];
      current = undefined;
      continue;
    }
    const cells = line.split('|').slice(1, -1).map((c) => c.trim());
    if (cells.length === 1) {
      // UCX >= 1.22: title rows ("<context> intra-node cfg#0", then the operation) before a header row.
      if (current) { // a new table's title after the rows of the last one
        current = undefined;
        titles = [];
      }
      titles.push(cells[0]);
    } else if (cells.length === 2) {
      // UCX 1.16-1.21: one title row, "| <context> ... cfg#0 | <operation> |", then the rows.
      current = { operation: cells[1], ranges: [] };
      tables.push(current);
      titles = [];
      format = 2;
    } else if (cells.length >= 3 && cells[0] === 'Range') {
      if (!current || current.ranges.length) {
        current = { operation: titles[titles.length - 1] ?? '', ranges: [] };
        tables.push(current);
      }
      format = 2;
    } else if (cells.length >= 3 && current) {
      const r = rangeOf(cells[0]);
      if (r) current.ranges.push({ from: r[0], to: r[1], protocol: cells[1], lanes: cells[2] });
    }
  }
  return { lanes, tables, format };
}

/**
 * The range of `operation` (a table whose operation is exactly this) that a message of `bytes` falls
 * in; undefined if the endpoint has no such table or no range covers the size.
 */
export function protocolFor(info: EndpointProtocols, operation: string, bytes: number): ProtocolRange | undefined {
  const table = info.tables.find((t) => t.operation === operation);
  return table?.ranges.find((r) => bytes >= r.from && (r.to === null || bytes <= r.to));
}
