//! `mail_owner` and its groups, read from /etc/passwd and /etc/group directly rather than
//! through glibc's NSS (getpwnam, getgrouplist), so that a statically linked qmqpd can switch
//! to it. Users and groups kept elsewhere (LDAP, sssd, systemd's nss-systemd) are not seen.
//! Owns only the reading; the switch itself is the program's.

use std::io::{self, Read};
use std::path::Path;

/// The largest /etc/passwd or /etc/group read.
const MAX_FILE: u64 = 16 << 20;
/// The most supplementary groups kept (Linux's NGROUPS_MAX).
const MAX_GROUPS: usize = 65536;

/// A user account: its ids and every group it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    /// The primary group first, then every group of /etc/group that lists the user.
    pub groups: Vec<u32>,
}

/// `name`'s account from the system's /etc/passwd and /etc/group; None when there is no such
/// user.
pub fn find_account(name: &str) -> io::Result<Option<Account>> {
    let passwd = read_text(Path::new("/etc/passwd"))?;
    let Some((uid, gid)) = passwd_entry(&passwd, name)? else {
        return Ok(None);
    };
    // A missing /etc/group leaves the primary group only.
    let group = match read_text(Path::new("/etc/group")) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    Ok(Some(Account {
        uid,
        gid,
        groups: member_groups(&group, name, gid),
    }))
}

fn read_text(path: &Path) -> io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            let size = f.metadata().map_or(0, |m| m.len()).min(MAX_FILE);
            bytes.reserve(usize::try_from(size).unwrap_or(0).saturating_add(1));
            f.take(MAX_FILE).read_to_end(&mut bytes)
        })
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
    // Non-UTF-8 bytes (a GECOS field in Latin-1) must not hide the other lines.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The uid and gid of `name` in passwd(5) text; a malformed line for `name` is an error.
pub fn passwd_entry(text: &str, name: &str) -> io::Result<Option<(u32, u32)>> {
    for line in text.lines() {
        let mut fields = line.split(':');
        if fields.next() != Some(name) {
            continue;
        }
        let _password = fields.next();
        let uid = fields.next().and_then(|f| f.parse::<u32>().ok());
        let gid = fields.next().and_then(|f| f.parse::<u32>().ok());
        return match (uid, gid) {
            (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed /etc/passwd entry for {name:?}"),
            )),
        };
    }
    Ok(None)
}

/// `gid`, then the gid of every group(5) line whose member list names `name`, each once.
pub fn member_groups(text: &str, name: &str, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    for line in text.lines() {
        let fields: Vec<&str> = line.splitn(4, ':').collect();
        let [_, _, id, members] = fields.as_slice() else {
            continue;
        };
        let Ok(id) = id.parse::<u32>() else {
            continue;
        };
        if members.split(',').any(|m| m.trim() == name)
            && !groups.contains(&id)
            && groups.len() < MAX_GROUPS
        {
            groups.push(id);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        qmqpd:x:998:997:qmqpd \u{fffd}:/var/spool/qmqpd:/usr/sbin/nologin\n\
        broken:x:abc:1::/:/bin/sh\n";

    #[test]
    fn passwd_entry_finds_ids_and_rejects_malformed_lines() {
        assert_eq!(passwd_entry(PASSWD, "qmqpd").unwrap(), Some((998, 997)));
        assert_eq!(passwd_entry(PASSWD, "qmqp").unwrap(), None);
        assert_eq!(passwd_entry(PASSWD, "").unwrap(), None);
        assert!(passwd_entry(PASSWD, "broken").is_err());
    }

    #[test]
    fn member_groups_lists_primary_then_memberships_once() {
        let group = "root:x:0:\nmail:x:8:qmqpd\nqmqpd:x:997:\nlists:x:40:bob, qmqpd ,eve\n\
                     dup:x:997:qmqpd\nqmqpdx:x:50:qmqpdx\nbad line\nbadgid:x:zz:qmqpd\n";
        assert_eq!(member_groups(group, "qmqpd", 997), [997, 8, 40]);
        assert_eq!(member_groups("", "qmqpd", 5), [5]);
    }

    #[test]
    fn find_account_reads_root_from_the_system_files() {
        let root = find_account("root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.groups.first(), Some(&0));
        assert_eq!(find_account("no-such-user-i13").unwrap(), None);
    }
}
