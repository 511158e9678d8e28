//! Request validation: each rule and its errno.

use crate::nbd::consts::*;
use crate::nbd::{transmission_flags, validate, Command, ExportInfo, Negotiated, Request};

const SIZE: u64 = 1 << 20;
const MAX: u32 = 64 * 1024;

fn neg(flags: u16, structured: bool, context: Option<u32>) -> Negotiated {
    Negotiated {
        export: ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: SIZE,
            flags,
            min_block: 512,
            preferred_block: 4096,
            max_block: MAX,
        },
        structured_replies: structured,
        base_allocation_context: context,
    }
}

fn full() -> Negotiated {
    neg(transmission_flags(false), true, Some(1))
}

fn r(command: Command, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        command,
        cookie: 1,
        offset,
        length,
    }
}

use Command::*;

#[test]
fn ordinary_requests_pass() {
    let n = full();
    for c in [Read, Write, Trim, WriteZeroes, Cache, BlockStatus] {
        assert_eq!(validate(&r(c, 0, 0, 4096), &n), Ok(()), "{c:?}");
        assert_eq!(validate(&r(c, 0, SIZE - 512, 512), &n), Ok(()), "{c:?}");
    }
    assert_eq!(validate(&r(Flush, 0, 0, 0), &n), Ok(()));
    assert_eq!(validate(&r(Disc, 0, 0, 0), &n), Ok(()));
}

#[test]
fn unknown_commands_are_einval() {
    for code in [8u16, 9, 100, u16::MAX] {
        assert_eq!(
            validate(&r(Unknown(code), 0, 0, 0), &full()),
            Err(NBD_EINVAL)
        );
    }
}

#[test]
fn unadvertised_commands_are_einval() {
    let base = transmission_flags(false);
    for (cmd, flag) in [
        (Flush, NBD_FLAG_SEND_FLUSH),
        (Trim, NBD_FLAG_SEND_TRIM),
        (WriteZeroes, NBD_FLAG_SEND_WRITE_ZEROES),
        (Cache, NBD_FLAG_SEND_CACHE),
    ] {
        let n = neg(base & !flag, true, Some(1));
        let length = if cmd == Flush { 0 } else { 512 };
        assert_eq!(
            validate(&r(cmd, 0, 0, length), &n),
            Err(NBD_EINVAL),
            "{cmd:?}"
        );
    }
}

#[test]
fn block_status_needs_structured_replies_and_a_context() {
    let f = transmission_flags(false);
    assert_eq!(
        validate(&r(BlockStatus, 0, 0, 512), &neg(f, false, None)),
        Err(NBD_EINVAL)
    );
    assert_eq!(
        validate(&r(BlockStatus, 0, 0, 512), &neg(f, true, None)),
        Err(NBD_EINVAL)
    );
    assert_eq!(
        validate(&r(BlockStatus, 0, 0, 512), &neg(f, false, Some(1))),
        Err(NBD_EINVAL)
    );
    assert_eq!(
        validate(&r(BlockStatus, 0, 0, 512), &neg(f, true, Some(1))),
        Ok(())
    );
}

#[test]
fn unknown_flags_are_einval() {
    for bit in 5..16 {
        assert_eq!(
            validate(&r(Read, 1 << bit, 0, 512), &full()),
            Err(NBD_EINVAL),
            "bit {bit}"
        );
    }
}

#[test]
fn flags_only_on_their_commands() {
    let n = full();
    // FUA: any command when SEND_FUA is advertised.
    for c in [Read, Write, Trim, WriteZeroes, Cache, BlockStatus] {
        assert_eq!(
            validate(&r(c, NBD_CMD_FLAG_FUA, 0, 512), &n),
            Ok(()),
            "{c:?}"
        );
    }
    assert_eq!(validate(&r(Flush, NBD_CMD_FLAG_FUA, 0, 0), &n), Ok(()));
    let no_fua = neg(
        transmission_flags(false) & !NBD_FLAG_SEND_FUA,
        true,
        Some(1),
    );
    assert_eq!(
        validate(&r(Write, NBD_CMD_FLAG_FUA, 0, 512), &no_fua),
        Err(NBD_EINVAL)
    );

    // NO_HOLE and FAST_ZERO: WRITE_ZEROES only.
    for flag in [NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_FAST_ZERO] {
        assert_eq!(validate(&r(WriteZeroes, flag, 0, 512), &n), Ok(()));
        for c in [Read, Write, Trim, Cache, BlockStatus] {
            assert_eq!(
                validate(&r(c, flag, 0, 512), &n),
                Err(NBD_EINVAL),
                "{c:?} {flag}"
            );
        }
    }
    assert_eq!(
        validate(
            &r(
                WriteZeroes,
                NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA,
                0,
                512
            ),
            &n
        ),
        Ok(())
    );
    // FAST_ZERO needs SEND_FAST_ZERO.
    let no_fast = neg(
        transmission_flags(false) & !NBD_FLAG_SEND_FAST_ZERO,
        true,
        Some(1),
    );
    assert_eq!(
        validate(&r(WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, 512), &no_fast),
        Err(NBD_EINVAL)
    );

    // REQ_ONE: BLOCK_STATUS only.
    assert_eq!(
        validate(&r(BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 512), &n),
        Ok(())
    );
    assert_eq!(
        validate(&r(Read, NBD_CMD_FLAG_REQ_ONE, 0, 512), &n),
        Err(NBD_EINVAL)
    );

    // DF: READ only, and only with SEND_DF and structured replies.
    assert_eq!(
        validate(&r(Read, NBD_CMD_FLAG_DF, 0, 512), &n),
        Err(NBD_EINVAL)
    );
    let df = neg(transmission_flags(false) | NBD_FLAG_SEND_DF, true, Some(1));
    assert_eq!(validate(&r(Read, NBD_CMD_FLAG_DF, 0, 512), &df), Ok(()));
    assert_eq!(
        validate(&r(Write, NBD_CMD_FLAG_DF, 0, 512), &df),
        Err(NBD_EINVAL)
    );
    let df_simple = neg(transmission_flags(false) | NBD_FLAG_SEND_DF, false, None);
    assert_eq!(
        validate(&r(Read, NBD_CMD_FLAG_DF, 0, 512), &df_simple),
        Err(NBD_EINVAL)
    );
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let n = neg(transmission_flags(true), true, Some(1));
    for c in [Write, Trim, WriteZeroes] {
        assert_eq!(validate(&r(c, 0, 0, 512), &n), Err(NBD_EPERM), "{c:?}");
        // EPERM even when also out of range.
        assert_eq!(validate(&r(c, 0, SIZE, 512), &n), Err(NBD_EPERM), "{c:?}");
    }
    for c in [Read, Cache, BlockStatus] {
        assert_eq!(validate(&r(c, 0, 0, 512), &n), Ok(()), "{c:?}");
    }
}

#[test]
fn flush_needs_zero_offset_and_length() {
    assert_eq!(validate(&r(Flush, 0, 512, 0), &full()), Err(NBD_EINVAL));
    assert_eq!(validate(&r(Flush, 0, 0, 512), &full()), Err(NBD_EINVAL));
}

#[test]
fn out_of_range_errno_depends_on_command() {
    let n = full();
    for (c, errno) in [
        (Read, NBD_EINVAL),
        (Trim, NBD_EINVAL),
        (Cache, NBD_EINVAL),
        (BlockStatus, NBD_EINVAL),
        (Write, NBD_ENOSPC),
        (WriteZeroes, NBD_ENOSPC),
    ] {
        assert_eq!(
            validate(&r(c, 0, SIZE - 512, 1024), &n),
            Err(errno),
            "{c:?}"
        );
        assert_eq!(validate(&r(c, 0, SIZE, 512), &n), Err(errno), "{c:?}");
        // offset + length overflows u64.
        assert_eq!(
            validate(&r(c, 0, u64::MAX - 511, 1024), &n),
            Err(errno),
            "{c:?}"
        );
    }
}

#[test]
fn misaligned_requests_are_einval() {
    let n = full();
    for c in [Read, Write, Trim, WriteZeroes, Cache, BlockStatus] {
        assert_eq!(validate(&r(c, 0, 1, 512), &n), Err(NBD_EINVAL), "{c:?}");
        assert_eq!(validate(&r(c, 0, 512, 100), &n), Err(NBD_EINVAL), "{c:?}");
    }
}

#[test]
fn over_max_block_is_einval_for_payload_commands() {
    let n = neg(transmission_flags(false), true, Some(1));
    let over = MAX + 512;
    for c in [Read, Write, Cache] {
        assert_eq!(validate(&r(c, 0, 0, MAX), &n), Ok(()), "{c:?}");
        assert_eq!(validate(&r(c, 0, 0, over), &n), Err(NBD_EINVAL), "{c:?}");
    }
    // Not limited: TRIM, BLOCK_STATUS, WRITE_ZEROES (our choice: the spec
    // limits it without FAST_ZERO, but the server splits it).
    assert_eq!(validate(&r(Trim, 0, 0, over), &n), Ok(()));
    assert_eq!(validate(&r(BlockStatus, 0, 0, over), &n), Ok(()));
    assert_eq!(validate(&r(WriteZeroes, 0, 0, over), &n), Ok(()));
    assert_eq!(
        validate(&r(WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, over), &n),
        Ok(())
    );
}

#[test]
fn zero_length_requests() {
    let n = full();
    for c in [Read, Write, Trim, WriteZeroes, Cache] {
        assert_eq!(validate(&r(c, 0, 0, 0), &n), Ok(()), "{c:?}");
        assert_eq!(validate(&r(c, 0, SIZE, 0), &n), Ok(()), "{c:?} at the end");
    }
    assert_eq!(validate(&r(BlockStatus, 0, 0, 0), &n), Err(NBD_EINVAL));
}

#[test]
fn disc_always_passes() {
    assert_eq!(validate(&r(Disc, 0xffff, 5, 5), &full()), Ok(()));
}
