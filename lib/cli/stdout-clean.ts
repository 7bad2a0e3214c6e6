// Imported first by the `kvwire` command, before anything loads UCX: UCX logs (warnings such as
// "transport 'cuda_copy' is not available") go to stdout by default, which would corrupt `--json`
// output. They go to stderr unless the caller chose a log file.
if (process.env.UCX_LOG_FILE === undefined) process.env.UCX_LOG_FILE = 'stderr';
export {};
