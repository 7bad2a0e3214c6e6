// `kvwire info`: what this machine and this build can do — versions, what the running UCX offers,
// the CUDA driver and devices, and for each transfer path "ready" or the exact reason it is not.
import { cudaInfo, ucxInfo, ucxVersion, type CudaInfo } from '../index';

export interface PathReadiness {
  path: string;
  ready: boolean;
  /** What it is when ready; why not otherwise. */
  detail: string;
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
      ready: ucx.transports.length > 0,
      detail: ucx.transports.length > 0 ? `active-message rendezvous over ${[...new Set(ucx.transports.map((t) => t.split('/')[0]).filter((t) => t !== 'self'))].join(', ')}`
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
    },
    {
      path: 'cuda_ipc (DRAM<->VRAM, same host)',
      ready: cudaReady,
      detail: cudaReady
        ? `between VRAM and host memory mapped here (this agent's regions, or a same-host peer's kvwire-allocated host region)${double}`
        : cudaWhy,
    },
    {
      path: 'GPUDirect RDMA (VRAM across hosts)',
      ready: false,
      detail: `not built yet: kvwire moves VRAM between processes on one host only (UCX ${ucx.version} ${ucxCuda ? 'does' : 'does not'} support CUDA memory${ucxCuda ? '' : '; Debian\'s UCX has no CUDA transports: use the libucx-cu12/cu13 build'}; RDMA transports here: ${['rc_verbs', 'rc_mlx5', 'dc_mlx5', 'ud_verbs', 'ud_mlx5'].filter(has).join(', ') || 'none'})`,
    },
  ];
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
