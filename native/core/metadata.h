// The metadata an agent publishes about itself, and its versioned binary codec.
// Decoding never trusts the blob: every length is bounds-checked and every failure is a Status.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "status.h"

namespace kvwire {

enum class MemKind : uint8_t { Dram = 0, Vram = 1 };

// Access a region grants to peers. Local use of one's own memory is never restricted.
enum Access : uint8_t { kAccessRead = 1, kAccessWrite = 2, kAccessReadWrite = 3 };

const char* memKindName(MemKind kind);

struct RegionInfo {
  uint32_t id = 0;
  std::string name;
  MemKind kind = MemKind::Dram;
  uint8_t access = kAccessReadWrite;
  uint32_t deviceId = 0;
  uint64_t base = 0;
  uint64_t length = 0;
  bool backendAllocated = false;  // allocated by the backend: a same-host peer may map it
  std::vector<uint8_t> rkey;      // backend-packed remote key (empty for VRAM: no UCX key)
  // Named blobs a path needs besides the key, e.g. "cuda-ipc" (a VRAM region's CUDA IPC handle).
  // Decoded only by the code that uses them, as strictly as the rest.
  struct Section {
    std::string name;
    std::vector<uint8_t> data;
  };
  std::vector<Section> sections;
  const std::vector<uint8_t>* section(const std::string& name) const {
    for (const auto& s : sections)
      if (s.name == name) return &s.data;
    return nullptr;
  }
};

struct AgentMetadata {
  std::string name;
  uint64_t agentId = 0;     // random per agent instance: tells two same-named agents apart
  uint64_t generation = 0;  // bumps whenever the agent's regions change
  std::string backend;      // "ucx"
  std::vector<uint8_t> workerAddress;
  std::vector<RegionInfo> regions;
};

// Format limits, enforced on both encode and decode.
constexpr uint32_t kMetadataMagic = 0x4d57564b;  // "KVWM" little-endian
// Version 2: a checksum trails the body, so a corrupted blob is refused before any of its bytes
// (the worker address and keys UCX parses, and can crash on) reach UCX. Version 3: regions carry
// named sections (the CUDA IPC handle of a VRAM region).
constexpr uint16_t kMetadataVersion = 3;
constexpr uint16_t kMetadataVersionNoSections = 2;
constexpr size_t kMaxRegionSections = 8;
constexpr uint32_t kMaxDeviceOrdinal = 1024;  // a VRAM region's device id must be below it
constexpr size_t kMaxNameBytes = 255;
// Notifications are small control messages: one limit for what is sent and what is accepted.
constexpr size_t kMaxNotifyBytes = 16u << 20;
constexpr size_t kMaxBlobBytes = 64u << 10;   // worker address / rkey (UCX's are well under 4 KiB)
constexpr size_t kMaxRegions = 1 << 16;
constexpr size_t kMaxMetadataBytes = 64u << 20;

Result<std::vector<uint8_t>> encodeMetadata(const AgentMetadata& md);
Result<AgentMetadata> decodeMetadata(const uint8_t* data, size_t size);
// The checksum that trails a version-2 blob: FNV-1a (64-bit) of every byte before it.
uint64_t metadataChecksum(const uint8_t* data, size_t size);

}  // namespace kvwire
