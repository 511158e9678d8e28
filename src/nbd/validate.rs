//! Request validation: given what the handshake negotiated, is a request
//! allowed, and if not, which NBD errno answers it.
//!
//! Section names in the comments refer to the NBD protocol document
//! (`doc/proto.md`). Where the spec leaves a case open we say what we
//! chose.

use super::consts::*;
use super::handshake::Negotiated;
use super::request::{Command, Request};

/// Checks `req` against the negotiated export and features. `Ok(())`
/// means the request may be executed; `Err(errno)` is the NBD error to
/// reply with (the request is then not executed).
///
/// Checks, in order (the first failure wins):
/// 1. the command is known and was advertised;
/// 2. every flag is known and applies to this command;
/// 3. writes to a read-only export;
/// 4. FLUSH carries zero offset and length;
/// 5. the range lies inside the export;
/// 6. offset and length are multiples of the minimum block size;
/// 7. the length is within the maximum block size, for READ, WRITE and
///    CACHE (the spec also limits WRITE_ZEROES; we accept any length);
/// 8. BLOCK_STATUS has a nonzero length.
///
/// `NBD_CMD_DISC` always passes: it gets no reply ("There is no reply to
/// an NBD_CMD_DISC"). A zero-length READ, WRITE, TRIM, WRITE_ZEROES or
/// CACHE passes too (the spec calls the behaviour "unspecified although the
/// server SHOULD NOT disconnect"): the caller replies success without I/O;
/// for a structured READ that is an `NBD_REPLY_TYPE_NONE` chunk, since an
/// OFFSET_DATA chunk must carry at least one byte.
pub fn validate(req: &Request, neg: &Negotiated) -> Result<(), u32> {
    let export = &neg.export;
    let advertised = |flag: u16| export.flags & flag != 0;

    // 1. Error values: "The server SHOULD return NBD_EINVAL if it receives
    // an unknown command." Transmission flags: "The client MUST NOT use a
    // feature documented as 'exposed' by a flag unless that flag was set";
    // we answer such uses with NBD_EINVAL as for unknown commands.
    let supported = match req.command {
        Command::Unknown(_) => false,
        Command::Disc => return Ok(()),
        Command::Read | Command::Write => true,
        Command::Flush => advertised(NBD_FLAG_SEND_FLUSH),
        Command::Trim => advertised(NBD_FLAG_SEND_TRIM),
        Command::WriteZeroes => advertised(NBD_FLAG_SEND_WRITE_ZEROES),
        Command::Cache => advertised(NBD_FLAG_SEND_CACHE),
        // Metadata querying: "Servers SHOULD reply with NBD_EINVAL to
        // clients sending NBD_CMD_BLOCK_STATUS without selecting at least
        // one metadata context"; the reply "MUST be sent as a structured
        // reply", so structured replies must be negotiated too.
        Command::BlockStatus => neg.structured_replies && neg.base_allocation_context.is_some(),
    };
    if !supported {
        return Err(NBD_EINVAL);
    }

    // 2. Error values: "The server SHOULD return NBD_EINVAL if it receives
    // an unknown command flag. It also SHOULD return NBD_EINVAL if it
    // receives a request with a flag not explicitly documented as
    // applicable to the given request."
    let mut allowed = 0;
    // Command flags: NBD_CMD_FLAG_FUA "is valid for all commands, provided
    // NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST
    // accept all commands with this bit set".
    if advertised(NBD_FLAG_SEND_FUA) {
        allowed |= NBD_CMD_FLAG_FUA;
    }
    match req.command {
        // NBD_CMD_FLAG_NO_HOLE: "valid during NBD_CMD_WRITE_ZEROES".
        // NBD_CMD_FLAG_FAST_ZERO: "The client MUST NOT set this unless the
        // server advertised NBD_FLAG_SEND_FAST_ZERO"; NBD_CMD_WRITE_ZEROES:
        // if not advertised the server "SHOULD fail with NBD_EINVAL".
        Command::WriteZeroes => {
            allowed |= NBD_CMD_FLAG_NO_HOLE;
            if advertised(NBD_FLAG_SEND_FAST_ZERO) {
                allowed |= NBD_CMD_FLAG_FAST_ZERO;
            }
        }
        // NBD_CMD_FLAG_DF: "valid during NBD_CMD_READ ... MUST NOT be set
        // unless the transmission flags include NBD_FLAG_SEND_DF" (which
        // needs structured replies).
        Command::Read if advertised(NBD_FLAG_SEND_DF) && neg.structured_replies => {
            allowed |= NBD_CMD_FLAG_DF;
        }
        // NBD_CMD_FLAG_REQ_ONE: "valid during NBD_CMD_BLOCK_STATUS".
        Command::BlockStatus => allowed |= NBD_CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(NBD_EINVAL);
    }

    // 3. Error values: "it SHOULD return NBD_EPERM if it receives a write
    // or trim request on a read-only export"; NBD_CMD_WRITE_ZEROES: "It
    // SHOULD return NBD_EPERM if it receives a write zeroes request on a
    // read-only export." Transmission flags, NBD_FLAG_READ_ONLY: "the
    // server MUST error subsequent write operations to the export".
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && advertised(NBD_FLAG_READ_ONLY) {
        return Err(NBD_EPERM);
    }

    // 4. NBD_CMD_FLUSH: "*length* and *offset* are reserved, and MUST be
    // set to all-zero."
    if req.command == Command::Flush {
        if req.offset != 0 || req.length != 0 {
            return Err(NBD_EINVAL);
        }
        return Ok(());
    }

    // 5. Block size constraints: "the client MUST NOT use a *length* which,
    // when added to *offset*, would exceed the export size." Error values:
    // "The server SHOULD return NBD_ENOSPC if it receives a write request
    // including one or more sectors beyond the size of the device ... It
    // SHOULD return NBD_EINVAL if it receives a read or trim request
    // including one or more sectors beyond the size of the device";
    // NBD_CMD_WRITE_ZEROES: "SHOULD return NBD_ENOSPC"; NBD_CMD_BLOCK_STATUS:
    // "SHOULD return NBD_EINVAL". CACHE is not named; we use NBD_EINVAL as
    // for reads.
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= export.size);
    if !in_range {
        return Err(
            if matches!(req.command, Command::Write | Command::WriteZeroes) {
                NBD_ENOSPC
            } else {
                NBD_EINVAL
            },
        );
    }

    // 6. Block size constraints: "the client MUST ensure that *offset* and
    // *length* are integer multiples of any advertised minimum block size
    // ... The server SHOULD report an NBD_EINVAL error if the client's
    // request is not aligned to advertised minimum block size boundaries".
    let min = u64::from(export.min_block.max(1));
    if req.offset % min != 0 || u64::from(req.length) % min != 0 {
        return Err(NBD_EINVAL);
    }

    // 7. Block size constraints: "for NBD_CMD_READ, NBD_CMD_WRITE,
    // NBD_CMD_CACHE and NBD_CMD_WRITE_ZEROES (except for when
    // NBD_CMD_FLAG_FAST_ZERO is set), the client MUST NOT use a *length*
    // larger than any advertised maximum block size. The server SHOULD
    // report an NBD_EINVAL error if ... [it] is larger than the advertised
    // maximum block size." (Not NBD_EOVERFLOW: "The server SHOULD NOT
    // return NBD_EOVERFLOW except as documented in response to
    // NBD_CMD_READ when NBD_CMD_FLAG_DF is supported.")
    // Our choice: WRITE_ZEROES of any length is accepted, as TRIM is (and as
    // qemu-nbd does): it carries no payload, and the server applies it in
    // bounded pieces, so the limit protects nothing here, while a client
    // that zeroes a whole device (BLKZEROOUT) would get an error.
    let limited = matches!(req.command, Command::Read | Command::Write | Command::Cache);
    if limited && req.length > export.max_block {
        return Err(NBD_EINVAL);
    }

    // 8. Our choice: a zero-length BLOCK_STATUS gets NBD_EINVAL, since a
    // successful reply needs at least one descriptor with a nonzero length
    // and there is no range to describe.
    if req.command == Command::BlockStatus && req.length == 0 {
        return Err(NBD_EINVAL);
    }

    Ok(())
}
