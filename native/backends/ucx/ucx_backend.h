// UCX backend: context, worker, endpoints, remote keys, and the three data paths
// (direct copy through ucp_rkey_ptr, active-message rendezvous, native RMA).
#pragma once
#include "../../core/backend.h"
