// Order statistics for the CLI's reports (demo, bench).

/** The p-th percentile (nearest rank below), 0 for no values. */
export function percentile(values: number[], p: number): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? 0;
}

export const median = (values: number[]): number => percentile(values, 50);
