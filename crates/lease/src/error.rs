//! sanlock's results as Rust errors: the codes of `sanlock_rv.h` are variants of [`Code`],
//! everything else is an errno.

/// Declares [`Code`] with its numeric values and descriptions.
macro_rules! codes {
    ($($variant:ident = $value:literal, $text:literal;)*) => {
        /// A sanlock result code (`sanlock_rv.h`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Code {
            $(
                #[doc = $text]
                $variant,
            )*
        }

        impl Code {
            /// The code for a negative return value, if it is one of sanlock's own.
            pub fn from_raw(rv: i32) -> Option<Self> {
                match rv {
                    $($value => Some(Self::$variant),)*
                    _ => None,
                }
            }

            /// The numeric value (negative).
            pub fn raw(self) -> i32 {
                match self {
                    $(Self::$variant => $value,)*
                }
            }

            /// What it means.
            pub fn describe(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }
    };
}

codes! {
    Error = -201, "a generic sanlock error";
    AioTimeout = -202, "the storage did not answer within the I/O timeout";
    WdError = -203, "the watchdog daemon failed";
    DblockRead = -210, "a ballot block could not be read";
    DblockWrite = -211, "a ballot block could not be written";
    DblockLver = -212, "a ballot block has another lease version";
    DblockMbal = -213, "a ballot block has a higher ballot";
    DblockChecksum = -214, "a ballot block has a bad checksum";
    LeaderRead = -220, "the leader record could not be read";
    LeaderWrite = -221, "the leader record could not be written";
    LeaderDiff = -222, "the leader record changed underneath";
    LeaderMagic = -223, "the area holds no sanlock lease (bad magic)";
    LeaderVersion = -224, "the leader record has an unknown version";
    LeaderSectorsize = -225, "the leader record has another sector size";
    LeaderLockspace = -226, "the lease belongs to another lockspace";
    LeaderResource = -227, "the lease has another resource name";
    LeaderNumhosts = -228, "the leader record has a bad host count";
    LeaderChecksum = -229, "the leader record has a bad checksum";
    AddlsSizes = -230, "the lockspace has another sector or align size";
    AddlsInvalidHostid = -231, "the host id is out of the lockspace's range";
    AcquireLver = -240, "the lease has another version than requested";
    AcquireLockspace = -241, "the lease's lockspace is not joined on this host";
    AcquireIddisk = -242, "the owner's host id could not be read";
    AcquireIdlive = -243, "another live host holds the lease";
    AcquireOwned = -244, "another host owns the lease";
    AcquireOther = -245, "another holder owns the lease (another host, or another process here)";
    AcquireShretry = -246, "a shared holder is in the way; retry";
    AcquireOwnedRetry = -247, "another host owns the lease; retry";
    ReleaseLver = -250, "the lease changed version while held";
    ReleaseOwner = -251, "the lease is owned by another host";
    RenewOwner = -260, "the host id is owned by another host";
    RenewDiff = -261, "the host id record changed underneath";
    HostidBusy = -262, "the host id is in use by another host";
    RequestMagic = -270, "a request record has a bad magic";
    RequestVersion = -271, "a request record has an unknown version";
    RequestOld = -272, "a request is for an old lease version";
    RequestLver = -273, "a request is for another lease version";
    RindexMagic = -274, "a resource index has a bad magic";
    RindexVersion = -275, "a resource index has an unknown version";
    RindexLockspace = -276, "a resource index belongs to another lockspace";
    RindexOffset = -277, "a resource index has a bad offset";
    RindexDiff = -278, "a resource index changed underneath";
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (sanlock {})", self.describe(), self.raw())
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sanlock answered with one of its own codes.
    #[error("sanlock {op} failed: {code}")]
    Sanlock {
        /// The operation.
        op: &'static str,
        /// Why.
        code: Code,
    },
    /// sanlock (or the connection to its daemon) answered with an errno.
    #[error("sanlock {op} failed")]
    Os {
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A name or path does not fit sanlock's fixed-size fields, or holds a NUL or a colon.
    #[error("{what} {value:?} cannot be used with sanlock: {why}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The daemon's answer could not be understood.
    #[error("sanlock {op} answered something unexpected: {what}")]
    Unexpected {
        /// The operation.
        op: &'static str,
        /// What.
        what: String,
    },
}

impl Error {
    /// The sanlock code, if the error is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Sanlock { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The errno, if the error is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Turns a sanlock return value into a result (`rv >= 0` is success).
pub(crate) fn check(op: &'static str, rv: i32) -> Result<i32, Error> {
    if rv >= 0 {
        return Ok(rv);
    }
    Err(match Code::from_raw(rv) {
        Some(code) => Error::Sanlock { op, code },
        None => Error::Os { op, source: std::io::Error::from_raw_os_error(-rv) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_errnos_are_told_apart() {
        let e = check("acquire", -243).expect_err("an error");
        assert_eq!(e.code(), Some(Code::AcquireIdlive));
        assert!(e.to_string().contains("another live host"), "{e}");
        let e = check("add_lockspace", -libc::ENOENT).expect_err("an error");
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(check("x", 3).expect("ok"), 3);
        assert_eq!(Code::from_raw(Code::RindexDiff.raw()), Some(Code::RindexDiff));
        assert_eq!(Code::from_raw(-200), None);
    }
}
