// Status and Result<T>: how every core and backend function reports failure.
// No exceptions cross the core boundary; the binding turns a Status into a KvwireError.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <variant>

namespace kvwire {

enum class Code : uint8_t {
  Ok = 0,
  InvalidParam,
  NotFound,
  NotAllowed,
  Mismatch,
  Backend,
  RemoteDisconnect,
  Canceled,
  Timeout,
  Unavailable,
  Closed,
};

// The JS-visible name of a code ("ERR_INVALID_PARAM", ...).
const char* codeName(Code code);

// kNoIndex marks an error that is not about one descriptor.
constexpr int64_t kNoIndex = -1;

class Status {
 public:
  Status() = default;
  Status(Code code, std::string message, int64_t index = kNoIndex)
      : code_(code), message_(std::move(message)), index_(index) {}
  static Status ok() { return {}; }

  bool isOk() const { return code_ == Code::Ok; }
  explicit operator bool() const { return isOk(); }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  int64_t index() const { return index_; }

 private:
  Code code_ = Code::Ok;
  std::string message_;
  int64_t index_ = kNoIndex;
};

template <typename T>
class Result {
 public:
  Result(T value) : value_(std::move(value)) {}          // NOLINT: implicit by design
  Result(Status status) : value_(std::move(status)) {}   // NOLINT
  bool isOk() const { return std::holds_alternative<T>(value_); }
  T& value() { return std::get<T>(value_); }
  const T& value() const { return std::get<T>(value_); }
  const Status& status() const {
    static const Status kOk;
    return isOk() ? kOk : std::get<Status>(value_);
  }

 private:
  std::variant<T, Status> value_;
};

}  // namespace kvwire
