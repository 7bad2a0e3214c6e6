// Path 'cma' between two real processes (fork): the grant check an initiator makes once, and the
// table lookup it makes before every copy. What must hold: only a grant inside the other process's
// kvwire table mapping is believed (a copy of one in ordinary memory is refused), and a lookup sees
// only live entries of the id asked for.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "backends/ucx/cma.h"

namespace kvwire::ucx {
namespace {

const uint8_t kNonce[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

struct Child {  // a process holding a CmaTable, a grant and fakes; killed when the test ends, however it ends
  pid_t pid = 0;
  uint64_t grant = 0, fake = 0, region = 0, misnamed = 0, wrongSize = 0;
  ~Child() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
};

// A memfd mapping with `name` and `bytes`, holding at a grant slot's offset a grant with our nonce.
uint64_t fakeTable(const char* name, size_t bytes) {
  const int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, bytes) != 0) _exit(4);
  auto* p = static_cast<uint8_t*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
  close(fd);
  if (p == MAP_FAILED) _exit(5);
  auto* g = reinterpret_cast<CmaGrant*>(p + sizeof(CmaHeader) + sizeof(CmaEntry) * kCmaSlots);
  std::memcpy(g->nonce, kNonce, sizeof kNonce);
  g->entries = reinterpret_cast<uint64_t>(p);
  g->slots = kCmaSlots;
  return reinterpret_cast<uint64_t>(g);
}

void spawn(Child& c) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  c.pid = fork();
  if (c.pid == 0) {
    static CmaTable table;
    static uint8_t region[4096];
    static CmaGrant fake[2];
    if (!table.init()) _exit(2);
    table.publish(7, 3, reinterpret_cast<uint64_t>(region), sizeof region);
    table.publish(7 + kCmaSlots, 3, 0x1000, 4096);  // same slot, other id: stays unpublished
    const int slot = table.grant(kNonce, 0);
    // A "grant" a peer could have written into some writable region: nonce, and a table of its own.
    std::memcpy(fake[0].nonce, kNonce, sizeof kNonce);
    fake[0].entries = reinterpret_cast<uint64_t>(&fake[1]);
    fake[0].slots = kCmaSlots;
    const uint64_t out[5] = {table.grantAddress(slot), reinterpret_cast<uint64_t>(&fake[0]), reinterpret_cast<uint64_t>(region),
                             fakeTable("kvwire-cma-table evil", kCmaTableBytes), fakeTable(kCmaTableName, kCmaTableBytes + (1u << 20))};
    if (write(fds[1], out, sizeof out) != sizeof out) _exit(3);
    for (;;) pause();  // until the test kills it
  }
  uint64_t in[5] = {};
  EXPECT_EQ(read(fds[0], in, sizeof in), static_cast<ssize_t>(sizeof in));
  c.grant = in[0];
  c.fake = in[1];
  c.region = in[2];
  c.misnamed = in[3];
  c.wrongSize = in[4];
  close(fds[0]);
  close(fds[1]);
}

TEST(Cma, OnlyAGrantInTheOtherProcessTableIsBelieved) {
  Child c;
  spawn(c);
  ASSERT_GT(c.pid, 0);
  const int pidfd = cmaWatch(c.pid);
  ASSERT_GE(pidfd, 0) << "pidfd_open: " << std::strerror(errno);
  EXPECT_FALSE(cmaGone(pidfd));
  uint64_t table = 0;
  EXPECT_EQ(cmaVerifyGrant(c.pid, c.grant, kNonce, &table), "");
  EXPECT_NE(table, 0u);
  uint64_t ignored = 0;
  EXPECT_EQ(cmaVerifyGrant(c.pid, c.fake, kNonce, &ignored), "it is not in a kvwire table mapping");
  EXPECT_EQ(cmaVerifyGrant(c.pid, c.misnamed, kNonce, &ignored), "it is not in a kvwire table mapping");
  EXPECT_EQ(cmaVerifyGrant(c.pid, c.wrongSize, kNonce, &ignored), "its mapping is not a whole kvwire table");
  EXPECT_EQ(cmaVerifyGrant(c.pid, c.grant + 8, kNonce, &ignored), "it is not at a grant slot");
  EXPECT_EQ(cmaVerifyGrant(c.pid, table, kNonce, &ignored), "it is not at a grant slot");
  uint8_t other[16] = {};
  EXPECT_EQ(cmaVerifyGrant(c.pid, c.grant, other, &ignored), "its grant does not hold our nonce");

  CmaEntry e{};
  uint64_t epoch = 0;
  ASSERT_EQ(cmaLookup(c.pid, c.grant, table, kNonce, 7, &e, &epoch), CmaLookup::Ok);
  EXPECT_EQ(e.base, c.region);
  EXPECT_EQ(e.length, 4096u);
  EXPECT_EQ(e.access, 3u);
  EXPECT_EQ(epoch, 1u);  // nothing withdrawn yet
  EXPECT_EQ(cmaEpoch(c.pid, table), 1u);
  // The grantee's safe epoch lands in its own grant slot (twice), nowhere else.
  ASSERT_TRUE(cmaWriteSafeEpoch(c.pid, c.grant, 42));
  CmaGrant g{};
  ASSERT_TRUE(cmaRead(c.pid, c.grant, &g, sizeof g));
  EXPECT_EQ(g.safeEpoch[0], 42u);
  EXPECT_EQ(g.safeEpoch[1], 42u);
  EXPECT_EQ(std::memcmp(g.nonce, kNonce, sizeof kNonce), 0);
  EXPECT_EQ(g.entries, table + sizeof(CmaHeader));
  EXPECT_EQ(cmaLookup(c.pid, c.grant, table, kNonce, 7 + kCmaSlots, &e, &epoch), CmaLookup::NotPublished);
  EXPECT_EQ(cmaLookup(c.pid, c.grant, table, kNonce, 8, &e, &epoch), CmaLookup::NotPublished);
  EXPECT_EQ(cmaLookup(c.pid, c.grant, table, other, 7, &e, &epoch), CmaLookup::GrantGone);

  uint8_t got[16] = {};
  CmaSpan live{got, reinterpret_cast<uint8_t*>(c.region), sizeof got};
  EXPECT_TRUE(cmaCopy(c.pid, false, &live, 1).isOk());
  std::atomic<bool> stop{true};  // the region was revoked: nothing more is copied
  EXPECT_EQ(cmaCopy(c.pid, false, &live, 1, &stop).code(), Code::NotFound);

  kill(c.pid, SIGKILL);
  waitpid(c.pid, nullptr, 0);
  const pid_t gone = c.pid;
  c.pid = 0;
  EXPECT_TRUE(cmaGone(pidfd));  // whatever process gets that pid next is not the one proven
  close(pidfd);
  EXPECT_EQ(cmaLookup(gone, c.grant, table, kNonce, 7, &e, &epoch), CmaLookup::GrantGone);
  uint8_t buf[8];
  CmaSpan span{buf, reinterpret_cast<uint8_t*>(c.region), sizeof buf};
  const Status st = cmaCopy(gone, false, &span, 1);
  EXPECT_EQ(st.code(), Code::RemoteDisconnect) << st.message();
}

TEST(Cma, ARetiredRegionWaitsForTheGranteesOwnSafeEpoch) {
  CmaTable t;
  ASSERT_TRUE(t.init());
  static uint8_t region[4096];
  t.publish(1, 3, reinterpret_cast<uint64_t>(region), sizeof region);
  const int slot = t.grant(kNonce, 0);
  ASSERT_GE(slot, 0);
  EXPECT_EQ(t.safeEpoch(slot), 1u);  // granted at epoch 1: nothing of it runs yet
  const uint64_t withdrawn = t.withdraw(1);
  EXPECT_EQ(withdrawn, 2u);
  EXPECT_LT(t.safeEpoch(slot), withdrawn);  // not safe until the grantee says so in the slot
  // Only a process that may write into this one can: here, this one.
  ASSERT_TRUE(cmaWriteSafeEpoch(getpid(), t.grantAddress(slot), withdrawn));
  EXPECT_EQ(t.safeEpoch(slot), withdrawn);
  // An ended grant's slot is not given again while it cools.
  t.endGrant(slot, 1000, 500);
  std::vector<int> cooling;
  t.coolingSlots(1200, &cooling);
  EXPECT_EQ(cooling, std::vector<int>{slot});
  for (int i = 0; i < 10; ++i) EXPECT_NE(t.grant(kNonce, 1200), slot);
  cooling.clear();
  t.coolingSlots(1600, &cooling);
  EXPECT_TRUE(cooling.empty());
}

}  // namespace
}  // namespace kvwire::ucx
