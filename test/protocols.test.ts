// agent.connections(): UCX's own description of each open connection (ucp_ep_print_info), parsed —
// checked between real processes against what UCX_PROTO_INFO=y logs in those processes; the parser
// against both UCX formats and against junk; and the bench's carriers built from it.
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent, parseEndpointInfo, protocolFor, type ConnectionInfo, type EndpointProtocols, type ProtocolTable } from '../lib';
import { amMessageBytes, carriersOf, carrierSummary, carrierText } from '../lib/cli/carriers';
import { PeerProcess, UCX_113 } from './helpers';

const MiB = 1 << 20;
let procs: PeerProcess[] = [];
afterEach(async () => {
  await Promise.all(procs.map((p) => p.close()));
  procs = [];
});

/** A UCX log file's lines without their "[time] [host:pid:thread]" prefix. */
const unprefixed = (log: string) => log.split('\n').map((l) => l.replace(/^\[[^\]]*\]\s*\[[^\]]*\]\s*/, '')).join('\n');

const sameTable = (a: ProtocolTable, b: ProtocolTable) => a.operation === b.operation && JSON.stringify(a.ranges) === JSON.stringify(b.ranges);

describe('agent.connections()', () => {
  for (const transports of ['shm,self', 'tcp']) {
    it(`describes each side's endpoint as UCX does, matching the tables UCX_PROTO_INFO=y logs (${transports})`, async () => {
      const dir = mkdtempSync(path.join(tmpdir(), 'kvwire-proto-'));
      const env = { UCX_PROTO_INFO: 'y', UCX_LOG_FILE: path.join(dir, 'ucx.%p.log') };
      const a = new PeerProcess('proto-init', env);
      const b = new PeerProcess('proto-target', env);
      procs.push(a, b);
      const [pa, pb] = await Promise.all([a.init({ transports, memory: 'registered', size: 4 * MiB }), b.init({ transports, memory: 'registered', size: 4 * MiB })]);
      await a.ok('load', { metadata: b.metadata });
      // Path am: the initiator sends WRITE data (reply flag); the target sends READ data back.
      for (const op of ['write', 'read'])
        expect((await a.ok('transfer', { op, peer: 'proto-target', path: 'am', localOffsets: [0], remoteOffsets: [MiB], lengths: [MiB] })).stats.path).toBe('am');
      const [ia, ib] = [await a.ok('connections'), await b.ok('connections')];
      // UCX writes its log file through a buffer: read it once the processes have exited.
      await Promise.all([a.close(), b.close()]);
      const logOf = (pid: number) => {
        const file = path.join(dir, `ucx.${pid}.log`);
        return existsSync(file) ? readFileSync(file, 'utf8') : '';
      };
      ia.log = logOf(pa.pid);
      ib.log = logOf(pb.pid);
      const out: ConnectionInfo = ia.connections.find((c: ConnectionInfo) => c.direction === 'outbound');
      const inb: ConnectionInfo = ib.connections.find((c: ConnectionInfo) => c.direction === 'inbound');
      expect(out?.peer).toBe('proto-target');
      expect(inb?.peer).toBe('proto-init');
      for (const c of [out, inb]) {
        expect(c.text).toMatch(/lane\[0\]/);
        expect(c.protocols.lanes.some((l) => (transports === 'tcp' ? /^tcp\//.test(l) : /^(sysv|posix)\//.test(l)))).toBe(true);
      }
      if (UCX_113) {
        // v1: thresholds, no lanes per protocol; UCX_PROTO_INFO describes only v2 selections, so it logs none.
        for (const c of [out, inb]) {
          expect(c.protocols.format).toBe(1);
          expect(protocolFor(c.protocols, 'am_send', MiB)?.protocol).toBe('rndv');
          expect(protocolFor(c.protocols, 'am_send', 0)?.protocol).toBe('egr/short');
        }
        expect(parseEndpointInfo(unprefixed(ia.log)).tables).toEqual([]);
        return;
      }
      const check = (c: ConnectionInfo, log: string, operation: string) => {
        expect(c.protocols.format).toBe(2);
        const mine = c.protocols.tables.find((t) => t.operation === operation);
        expect(mine, `${operation} in ${c.direction} connection`).toBeDefined();
        // Every size has exactly one protocol: the ranges tile 0..inf.
        let next = 0;
        for (const r of mine!.ranges) {
          expect(r.from).toBe(next);
          expect(r.lanes).not.toBe('');
          next = r.to === null ? Infinity : r.to + 1;
        }
        expect(next).toBe(Infinity);
        // UCX logged the same table (UCX_PROTO_INFO=y prints each selection once, when it is made).
        const logged = parseEndpointInfo(unprefixed(log)).tables;
        expect(logged.length).toBeGreaterThan(0);
        expect(logged.some((t) => sameTable(t, mine!)), `${operation}: ${JSON.stringify(mine)} not among ${logged.length} logged tables: ${JSON.stringify(logged)}`).toBe(true);
      };
      check(out, ia.log, 'active message by ucp_am_send* with reply flag from host memory');
      check(inb, ib.log, 'active message by ucp_am_send* from host memory');
    });
  }

  it('with a secret, lists an inbound connection once the handshake is done, under the name the peer proved', async () => {
    const secret = Buffer.alloc(32, 7);
    const target = await Agent.create({ name: 'proto-vault', secret, ucx: { transports: 'shm,self' } });
    const friend = await Agent.create({ name: 'proto-friend', secret, ucx: { transports: 'shm,self' } });
    try {
      target.register(Buffer.alloc(4096), { name: 'kv' });
      const mine = friend.register(Buffer.alloc(4096), { name: 'kv' });
      const remote = friend.loadPeer(target.metadata()).region('kv');
      expect(target.connections()).toEqual([]); // loaded, not yet connected
      await friend.write(mine.descriptors([0], [64]), remote.descriptors([0], [64]));
      expect(target.connections().map((c) => [c.peer, c.direction])).toEqual([['proto-friend', 'inbound']]);
      expect(friend.connections().map((c) => [c.peer, c.direction])).toEqual([['proto-vault', 'outbound']]);
    } finally {
      await Promise.all([target.close(), friend.close()]);
    }
  });

  it('is empty for an agent with no connection, and once closed', async () => {
    const a = await Agent.create({ name: 'proto-lonely', ucx: { transports: 'shm,self' } });
    expect(a.connections()).toEqual([]);
    await a.close();
    expect(a.connections()).toEqual([]);
  });
});

// Excerpts of what UCX 1.13 and 1.22 print for an endpoint (ucp_ep_print_info).
const V1 = `#
# UCP endpoint
#
#               peer: <no debug data>
#                 lane[0]:  1:sysv/memory.0 md[1]           -> md[1]/sysv/sysdev[255] am am_bw#0 keepalive
#                 lane[1]:  2:posix/memory.0 md[2]          -> md[2]/posix/sysdev[255]
#
#                 am_send: 0..<egr/short>..93..<egr/bcopy>..8256..<rndv>..(inf)
#                  put[0]: 0..<short>..4294967296..<bcopy>..(inf)
#                  rma_bw: mds rndv_rkey_size 9
#`;
const V2 = `#                 lane[0]:  1:tcp/lo.0 md[0]                -> md[0]/tcp/sysdev[255] seg 4294967295 am keepalive wireup
# +---------------+--------------------------------------------+--------+
# | kvwire inter-node cfg#1                                             |
# | active message by ucp_am_send* with reply flag from host memory     |
# +---------------+--------------------------------------------+--------+
# |     Range     |                Description                 | Config |
# +---------------+--------------------------------------------+--------+
# |             0 | short                                      | tcp/lo |
# |      1..65520 | zero-copy                                  | tcp/lo |
# | 65521..273738 | multi-frag zero-copy                       | tcp/lo |
# |   273739..inf | (?) rendezvous zero-copy                   | tcp/lo |
# +---------------+--------------------------------------------+--------+
# +--------------+-------------------------------------------+-------------+
# | kvwire intra-node cfg#0                                                |
# | active message by ucp_am_send* from host memory                        |
# +--------------+-------------------------------------------+-------------+
# |    Range     |                Description                |   Config    |
# +--------------+-------------------------------------------+-------------+
# |        0..92 | short                                     | sysv/memory |
# | 8249..262143 | multi-frag copy-in                        | sysv/memory |
# |    256K..inf | (?) rendezvous zero-copy read from remote | cma/memory  |
# +--------------+-------------------------------------------+-------------+
# | kvwire intra-node cfg#0                                                |
# | active message by ucp_am_send* from cuda/GPU0                          |
# +--------------+-------------------------------------------+-------------+
# |    Range     |                Description                |   Config    |
# |     0..inf   | (?) rendezvous pipeline cuda_copy         | cuda_copy/cuda |
`;
// UCX 1.16-1.21: a one-row title (context | operation), no header row.
const V16 = `# +--------------------------------+---------------------------------------------------------+
# | ucp_context_0 intra-node cfg#0 | active message by ucp_am_send* from host memory          |
# +--------------------------------+-----------------------------------------+---------------+
# |                         0..92  | short                                   | sysv/memory   |
# |                      93..8248  | copy-in                                 | sysv/memory   |
# |                     8249..inf  | (?) rendezvous fragmented copy-in copy-out | sysv/memory |
# +--------------------------------+-----------------------------------------+---------------+
# | ucp_context_0 intra-node cfg#0 | active message by ucp_am_send* with reply flag from host memory |
# +--------------------------------+-----------------------------------------+---------------+
# |                         0..84  | short                                   | sysv/memory   |
# |                       85..2P   | copy-in                                 | sysv/memory   |
`;

describe('parseEndpointInfo', () => {
  it('reads UCX 1.13 v1 thresholds: each range up to the next threshold, no lane', () => {
    const p = parseEndpointInfo(V1);
    expect(p.format).toBe(1);
    expect(p.lanes).toEqual(['sysv/memory', 'posix/memory']);
    expect(p.tables.map((t) => t.operation)).toEqual(['am_send', 'put[0]']);
    expect(p.tables[0].ranges).toEqual([
      { from: 0, to: 92, protocol: 'egr/short', lanes: '' },
      { from: 93, to: 8255, protocol: 'egr/bcopy', lanes: '' },
      { from: 8256, to: null, protocol: 'rndv', lanes: '' },
    ]);
    expect(protocolFor(p, 'am_send', 8255)?.protocol).toBe('egr/bcopy');
    expect(protocolFor(p, 'am_send', 8256)?.protocol).toBe('rndv');
    expect(protocolFor(p, 'tag_send', 1)).toBeUndefined();
  });

  it('reads UCX 1.22 protocol tables: operation titles, single sizes, K suffixes, open ends, lanes', () => {
    const p = parseEndpointInfo(V2);
    expect(p.format).toBe(2);
    expect(p.lanes).toEqual(['tcp/lo']);
    expect(p.tables.map((t) => t.operation)).toEqual([
      'active message by ucp_am_send* with reply flag from host memory',
      'active message by ucp_am_send* from host memory',
      'active message by ucp_am_send* from cuda/GPU0',
    ]);
    const reply = p.tables[0].operation;
    expect(protocolFor(p, reply, 0)).toEqual({ from: 0, to: 0, protocol: 'short', lanes: 'tcp/lo' });
    expect(protocolFor(p, reply, 65520)?.protocol).toBe('zero-copy');
    expect(protocolFor(p, reply, 4 * MiB)).toEqual({ from: 273739, to: null, protocol: '(?) rendezvous zero-copy', lanes: 'tcp/lo' });
    expect(protocolFor(p, p.tables[1].operation, 256 << 10)?.lanes).toBe('cma/memory');
    expect(protocolFor(p, p.tables[1].operation, 1000)).toBeUndefined(); // a gap in this excerpt: no range, no guess
  });

  it('reads UCX 1.16-1.21 tables: a one-row title, no header row, P/E suffixes', () => {
    const p = parseEndpointInfo(V16);
    expect(p.format).toBe(2);
    expect(p.tables.map((t) => t.operation)).toEqual(['active message by ucp_am_send* from host memory',
      'active message by ucp_am_send* with reply flag from host memory']);
    expect(protocolFor(p, p.tables[0].operation, MiB)).toEqual({ from: 8249, to: null, protocol: '(?) rendezvous fragmented copy-in copy-out', lanes: 'sysv/memory' });
    expect(p.tables[1].ranges[1]).toEqual({ from: 85, to: 2 * 2 ** 50, protocol: 'copy-in', lanes: 'sysv/memory' });
  });

  it('never throws on junk and believes nothing it cannot parse', () => {
    const junk = ['', '|', '||||', '| Range | a | b |', '| 1..x | p | l |', '# am_send: 0..<a>..zz..<b>..(inf)', 'lane[0]: x',
      '| 9999999999999999999999K..inf | p | l |', '\u0000\uffff'.repeat(100), V2.slice(0, 333), V1.replace(/\n/g, '\r\n')];
    for (let i = 0; i < 2000; i++) {
      const a = V2.slice(0, (i * 7919) % V2.length);
      junk.push(a + V1.slice((i * 104729) % V1.length));
    }
    for (const text of junk) {
      const p: EndpointProtocols = parseEndpointInfo(text);
      for (const t of p.tables)
        for (const r of t.ranges) {
          expect(Number.isFinite(r.from)).toBe(true);
          expect(r.to === null || Number.isFinite(r.to)).toBe(true);
        }
    }
    expect(parseEndpointInfo('| 1..x | p | l |').tables).toEqual([]);
    expect(parseEndpointInfo('# am_send: 0..<a>..zz..<b>..(inf)').tables).toEqual([]);
  });
});

describe('bench carriers', () => {
  const v2 = parseEndpointInfo(V2);
  const conn = (protocols: EndpointProtocols) => ({ peer: 'x', direction: 'outbound', protocols });
  it('am: WRITE data is the initiator\'s reply-flag message, READ data the target\'s plain one; sizes include kvwire\'s header', () => {
    const [w] = carriersOf(['am'], 'write', 4 * MiB, 4, false, conn(v2), undefined);
    expect(w).toMatchObject({ by: 'ucx', side: 'initiator', messageBytes: 4 * MiB + 32, protocol: '(?) rendezvous zero-copy', lanes: 'tcp/lo' });
    expect(w.operation).toMatch(/with reply flag from host memory/);
    const [r] = carriersOf(['am'], 'read', 256 << 10, 64, false, undefined, conn(v2));
    expect(r).toMatchObject({ side: 'target', messageBytes: (256 << 10) + 12, protocol: '(?) rendezvous zero-copy read from remote', lanes: 'cma/memory' });
    // Small blocks go packed: as many as fit in 8 KiB of payload (WRITE: a 16 B entry each), or the whole batch.
    expect(amMessageBytes('write', 64, 10_000)).toBe(16 + 102 * 80);
    expect(amMessageBytes('read', 1024, 10_000)).toBe(16 + 8 * 1024);
    expect(amMessageBytes('write', 64, 1)).toBe(16 + 80);
    expect(amMessageBytes('write', 1025, 1)).toBe(1025 + 32);
    const [packed] = carriersOf(['am'], 'write', 64, 10_000, false, conn(v2), undefined);
    expect(packed).toMatchObject({ messageBytes: 8176, protocol: 'zero-copy' });
    // VRAM as the source: UCX's cuda table ("from cuda/GPU0") for blocks over 1 KiB; packed ones are staged in host memory.
    const [dev] = carriersOf(['am'], 'read', MiB, 16, true, undefined, conn(v2));
    expect(dev).toMatchObject({ protocol: '(?) rendezvous pipeline cuda_copy', lanes: 'cuda_copy/cuda' });
    expect(dev.operation).toMatch(/from cuda\/GPU0$/);
    const [staged] = carriersOf(['am'], 'read', 64, 1, true, undefined, conn(v2));
    expect(staged.operation).toMatch(/from host memory$/);
  });

  it('says why where it cannot know, and names kvwire\'s own copies', () => {
    const [remote] = carriersOf(['am'], 'read', MiB, 16, false, conn(v2), undefined, { target: 'the target is remote' });
    expect(remote).toMatchObject({ protocol: 'unknown', unknown: 'the target is remote' });
    const [v1] = carriersOf(['am'], 'write', MiB, 16, false, conn(parseEndpointInfo(V1)), undefined);
    expect(v1).toMatchObject({ protocol: 'rndv', lanes: 'sysv/memory+posix/memory', operation: 'am_send' });
    const [none] = carriersOf(['am'], 'write', MiB, 16, false, conn(parseEndpointInfo('')), undefined);
    expect(none.unknown).toMatch(/no protocol selection/);
    // RMA: UCX 1.13 lists put/get per lane; later UCX keeps them with the remote key.
    const [put] = carriersOf(['rma'], 'write', MiB, 16, false, conn(parseEndpointInfo(V1)), undefined);
    expect(put).toMatchObject({ operation: 'put[0]', protocol: 'short' }); // 1.13 shm: short up to 4 GiB
    const [rma2] = carriersOf(['rma'], 'read', MiB, 16, false, conn(v2), undefined);
    expect(rma2.unknown).toMatch(/remote key/);
    const both = carriersOf(['cma', 'direct'], 'write', MiB, 16, false, undefined, undefined);
    expect(both.map((c) => c.by)).toEqual(['kvwire', 'kvwire']);
    expect(carrierText(both[0])).toMatch(/process_vm_writev/);
    const [w] = carriersOf(['am'], 'write', 4 * MiB, 4, false, conn(v2), undefined);
    expect(carrierText(w)).toBe(`am: UCX (?) rendezvous zero-copy on tcp/lo (initiator's ${4 * MiB + 32} B messages)`);
    // The tables' short form (kvwire bench, bench/ucx-builds.cjs).
    expect(carrierSummary(w)).toBe('am: (?) rendezvous zero-copy on tcp/lo');
    expect(carrierSummary(both[0])).toBe('cma: kvwire copy');
    expect(carrierSummary(remote)).toBe('am: unknown (the target is remote)');
  });
});
