// `kvwire info`: what this machine and this build can do — versions, what the running UCX offers,
// the CUDA driver and devices, and for each transfer path "ready" or the exact reason it is not.
import { existsSync } from 'node:fs';
import { cudaInfo, ucxInfo, ucxVersion, type CudaInfo } from '../index';

export interface PathReadiness {
  path: string;
  ready: boolean;
  /** What it is when ready; why not otherwise. */
  detail: string;
  /** Ready only through kvwire's CUDA test double (KVWIRE_CUDA_DRIVER): host memory, not a GPU. */
  testDouble?: boolean;
}

/** KVWIRE_VRAM_STAGING_LIMIT as agents read it (native/backends/ucx): bytes, or why Agent.create refuses it. */
function stagingLimit(): { bytes: number } | { error: string } {
  const text = process.env.KVWIRE_VRAM_STAGING_LIMIT;
  if (text === undefined || text === '') return { bytes: 2 ** 30 };
  const bytes = /^\s*\+?[0-9]+$/.test(text) ? Number(text) : NaN;
  if (!(bytes >= 2 ** 20 && bytes <= 2 ** 40))
    return { error: `KVWIRE_VRAM_STAGING_LIMIT '${text}' is not a byte count from 1048576 to 2^40: Agent.create refuses it` };
  return { bytes };
}

const byteText = (n: number) => (n % 2 ** 30 === 0 ? `${n / 2 ** 30} GiB` : n % 2 ** 20 === 0 ? `${n / 2 ** 20} MiB` : `${n} bytes`);

/** Whether the nvidia-peermem (or older nv_peer_mem) module is loaded: what lets a NIC reach VRAM. */
function peerMemModule(): string | null {
  for (const m of ['nvidia_peermem', 'nv_peer_mem']) if (existsSync(`/sys/module/${m}`)) return m;
  return null;
}

export interface KvwireInfo {
  kvwire: string;
  node: string;
  ucx: { version: string; transports: string[]; memoryTypes: string[]; error?: string };
  cuda: CudaInfo;
  paths: PathReadiness[];
}

export function collectInfo(): KvwireInfo {
  const ucx = { version: ucxVersion(), ...ucxInfo() };
  const cuda = cudaInfo();
  const has = (tl: string) => ucx.transports.some((t) => t.split('/')[0] === tl);
  const sharedMemory = ['posix', 'sysv', 'xpmem'].filter(has);
  const double = cuda.testDouble ? ` — TEST DOUBLE (${cuda.testDouble}): host memory standing in for a GPU, not a GPU` : '';
  const cudaReady = cuda.available && cuda.ipcProblem === undefined;
  const cudaWhy = cuda.reason ?? `CUDA IPC export fails here (trial on device 0): ${cuda.ipcProblem}`;
  const ucxCuda = ucx.memoryTypes.includes('cuda');
  const stagingEnv = process.env.KVWIRE_VRAM_STAGING;
  const staging = stagingEnv !== undefined && stagingEnv !== '' && stagingEnv !== '0';
  const vramThroughUcx = cuda.available && ucxCuda && !staging; // as the agent decides (native/backends/ucx)
  const rdma = ['rc_verbs', 'rc_mlx5', 'dc_mlx5', 'ud_verbs', 'ud_mlx5'].filter(has);
  const peermem = peerMemModule();
  const limit = stagingLimit();
  const reaching = [...new Set(ucx.transports.map((t) => t.split('/')[0]).filter((t) => t !== 'self'))];
  const testDouble = cuda.testDouble ? { testDouble: true } : {};
  const paths: PathReadiness[] = [
    {
      path: 'direct (host, same host)',
      ready: sharedMemory.length > 0,
      detail: sharedMemory.length > 0
        ? `kvwire-allocated host memory mapped by same-host peers (UCX ${sharedMemory.join(', ')})`
        : 'UCX offers no shared-memory transport (posix, sysv) with these settings (UCX_TLS?)',
    },
    {
      path: 'am (host, any host)',
      ready: reaching.length > 0,
      detail: reaching.length > 0 ? `active-message rendezvous over ${reaching.join(', ')}`
        : ucx.transports.length > 0 ? "UCX offers only 'self' with these settings: no other process is reachable (UCX_TLS?)"
        : `UCX offers no transport${ucx.error ? `: ${ucx.error}` : ''}`,
    },
    {
      path: 'cma (host, same host)',
      ready: has('cma'),
      detail: has('cma') ? 'registered host memory copied with process_vm_readv/writev by the initiator'
        : 'UCX reports no cma transport here (ptrace restrictions, or UCX_TLS excludes it)',
    },
    {
      path: 'cuda_ipc (VRAM<->VRAM, same host)',
      ready: cudaReady,
      detail: cudaReady ? `peer VRAM opened with CUDA IPC, copied on this process's CUDA stream${double}` : cudaWhy,
      ...(cudaReady ? testDouble : {}),
    },
    {
      path: 'cuda_ipc (DRAM<->VRAM, same host)',
      ready: cudaReady,
      detail: !cudaReady ? cudaWhy
        : sharedMemory.length > 0
          ? `between VRAM and host memory mapped here (this agent's regions, or a same-host peer's kvwire-allocated host region)${double}`
          : `between VRAM and this agent's own host regions only (no shared-memory transport with these settings: a peer's host memory is not mapped here, so it goes by am)${double}`,
      ...(cudaReady ? testDouble : {}),
    },
    {
      path: 'am (VRAM, any host)',
      ready: cuda.available && reaching.length > 0 && 'bytes' in limit,
      detail: !cuda.available ? cuda.reason ?? 'no CUDA driver'
        : reaching.length === 0 ? 'no UCX transport reaches another process (see the host am path)'
        : 'error' in limit ? limit.error
        : vramThroughUcx
          ? `VRAM handed to UCX with its memory type (UCX ${ucx.version} supports CUDA memory): large segments without a host copy by kvwire; small ones packed through host memory${double}`
          : `VRAM staged by kvwire through host memory on each side (${staging ? 'KVWIRE_VRAM_STAGING is set' : `UCX ${ucx.version} has no CUDA memory type${ucx.error ? '' : "; Debian's UCX has none: the libucx-cu12/cu13 build has"}`}); at most ${byteText(limit.bytes)} staged per connection served (KVWIRE_VRAM_STAGING_LIMIT)${double}`,
      ...(cuda.available ? testDouble : {}),
    },
    {
      path: 'GPUDirect RDMA (VRAM across hosts, zero-copy)',
      ready: vramThroughUcx && rdma.length > 0 && peermem !== null,
      detail: !vramThroughUcx
        ? 'VRAM is not handed to UCX here (see the VRAM am path)'
        : rdma.length === 0
          ? `no RDMA transport in UCX here (tcp stages through host memory inside UCX)`
          : peermem === null
            ? `UCX has RDMA (${rdma.join(', ')}) but no nvidia-peermem module is loaded (/sys/module/nvidia_peermem): UCX stages VRAM through host memory unless the driver and NIC offer dma-buf (UCX_PROTO_INFO=y shows its choice)`
            : `UCX may move VRAM straight to the NIC (${rdma.join(', ')}, ${peermem} loaded; UCX_PROTO_INFO=y shows its choice)`,
    },
  ];
  // Nothing works when agents cannot be created at all.
  if ('error' in limit) for (const p of paths) if (p.ready) Object.assign(p, { ready: false, detail: limit.error });
  return { kvwire: require('../../package.json').version, node: process.version, ucx, cuda, paths };
}

export function formatInfo(info: KvwireInfo): string {
  const lines = [
    `kvwire ${info.kvwire} on Node ${info.node}`,
    `UCX ${info.ucx.version}: ${info.ucx.error ?? `${info.ucx.transports.length} transports (${info.ucx.transports.join(', ') || 'none'}); memory types ${info.ucx.memoryTypes.join(', ') || 'none'}`}`,
  ];
  const c = info.cuda;
  if (c.available) {
    lines.push(`CUDA driver ${c.driver} (version ${c.version})${c.testDouble ? ` — TEST DOUBLE: ${c.testDouble}` : ''}`);
    for (const d of c.devices) lines.push(`  device ${d.ordinal}: ${d.name}, ${(d.totalBytes / 2 ** 30).toFixed(1)} GiB`);
  } else {
    lines.push(`CUDA: unavailable — ${c.reason}`);
  }
  lines.push('paths:');
  for (const p of info.paths) lines.push(`  ${p.ready ? 'ready    ' : 'not ready'}  ${p.path}: ${p.detail}`);
  return lines.join('\n');
}
