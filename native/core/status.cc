#include "status.h"

namespace kvwire {

const char* codeName(Code code) {
  switch (code) {
    case Code::Ok: return "OK";
    case Code::InvalidParam: return "ERR_INVALID_PARAM";
    case Code::NotFound: return "ERR_NOT_FOUND";
    case Code::NotAllowed: return "ERR_NOT_ALLOWED";
    case Code::Mismatch: return "ERR_MISMATCH";
    case Code::Backend: return "ERR_BACKEND";
    case Code::RemoteDisconnect: return "ERR_REMOTE_DISCONNECT";
    case Code::Canceled: return "ERR_CANCELED";
    case Code::Timeout: return "ERR_TIMEOUT";
    case Code::Unavailable: return "ERR_UNAVAILABLE";
    case Code::Closed: return "ERR_CLOSED";
  }
  return "ERR_UNKNOWN";
}

}  // namespace kvwire
