//! Replacing a file without ever damaging another: what `kiln run --output`, the tune
//! cache and `kiln tune --export` write through.
//!
//! - The bytes go to a new temporary file in the destination's directory, created
//!   exclusively (`create_new`), with a name no user path holds
//!   (`.<name>.kiln-<pid>-<counter>-<nanos>.tmp`), are synced, and the file is renamed
//!   over the destination: a reader sees the old file or the new one, never half.
//! - A destination that exists and is not a regular file (a directory, a character or
//!   block device, a FIFO, a socket) is refused before anything is written.
//! - A symbolic link is followed: the file it points to is replaced, the link stays.
//! - On any failure the temporary file is removed; the destination is untouched.
//! - A process killed while writing leaves its temporary file behind; the next write of
//!   the same destination removes those whose process is gone (where `/proc` tells).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn refuse(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "{} is {what}, not a regular file (kiln replaces only regular files)",
            path.display()
        ),
    )
}

/// Reads a regular file as text. Anything else (a directory, a device such as
/// `/dev/zero`, a FIFO: read without end, or never answering) is refused with an
/// `InvalidInput` error that says what it is; a missing file stays `NotFound`. Symbolic
/// links are followed.
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if let Some(what) = special_kind(&meta).or((!meta.is_file()).then_some("not a file")) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is {what}, not a regular file", path.display()),
        ));
    }
    std::fs::read_to_string(path)
}

/// What kind of non-regular file `meta` describes, if it is one.
fn special_kind(meta: &std::fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return Some("a character device");
        }
        if t.is_block_device() {
            return Some("a block device");
        }
        if t.is_fifo() {
            return Some("a FIFO");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    (!t.is_file()).then_some("not a regular file")
}

/// The file a write to `path` replaces: `path`, or what its symbolic links lead to.
/// Refuses a destination that exists and is not a regular file.
pub fn destination(path: &Path) -> std::io::Result<PathBuf> {
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(path) {
            Ok(t) => t,
            // A dangling link: the file it names is created.
            Err(_) => {
                let link = std::fs::read_link(path)?;
                match path.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                }
            }
        },
        _ => path.to_path_buf(),
    };
    match std::fs::metadata(&target) {
        Ok(m) => match special_kind(&m) {
            Some(kind) => Err(refuse(path, kind)),
            None => Ok(target),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(target),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `bytes` as the module docs say.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let target = destination(path)?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| refuse(path, "a directory"))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{name}.kiln-{}-{}-{nanos}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        // The rename itself is durable once the directory is synced (where it can be).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        remove_orphans(&dir, &name);
    }
    written
}

/// Removes the temporary files of `name` in `dir` left by processes that no longer
/// exist (killed while writing). Only where `/proc` lists processes (Linux); a file
/// whose process may still be writing is never touched.
fn remove_orphans(dir: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.kiln-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|_| file.ends_with(".tmp")) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-fsio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".kiln-"))
            .collect()
    }

    #[test]
    fn reads_regular_files_only() {
        let d = scratch("read");
        std::fs::write(d.join("a.json"), "{}").expect("write");
        assert_eq!(read_to_string(&d.join("a.json")).expect("read"), "{}");
        let e = read_to_string(&d).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("a directory"), "{e}");
        assert_eq!(
            read_to_string(&d.join("missing")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        // A device is never read (/dev/zero would be read without end).
        #[cfg(unix)]
        {
            let e = read_to_string(Path::new("/dev/zero")).unwrap_err();
            assert!(e.to_string().contains("a character device"), "{e}");
        }
    }

    #[test]
    fn replaces_and_never_touches_a_file_named_like_the_old_temporary() {
        let d = scratch("tmpname");
        let input = d.join("t.safetensors.tmp");
        std::fs::write(&input, b"input").expect("write");
        replace_file(&d.join("t.safetensors"), b"out").expect("written");
        assert_eq!(std::fs::read(&input).expect("input kept"), b"input");
        assert_eq!(std::fs::read(d.join("t.safetensors")).expect("out"), b"out");
        replace_file(&d.join("t.safetensors"), b"again").expect("replaced");
        assert_eq!(
            std::fs::read(d.join("t.safetensors")).expect("out"),
            b"again"
        );
        assert!(leftovers(&d).is_empty());
    }

    #[test]
    fn a_killed_writers_temporary_file_is_removed_by_the_next_write() {
        let d = scratch("orphans");
        let out = d.join("o.safetensors");
        // A pid past any kernel's pid_max (never alive), this process's, and another
        // destination's: only the first goes.
        let dead = d.join(".o.safetensors.kiln-999999999-0-1.tmp");
        let mine = d.join(format!(
            ".o.safetensors.kiln-{}-7-1.tmp",
            std::process::id()
        ));
        let other = d.join(".p.safetensors.kiln-999999999-0-1.tmp");
        for f in [&dead, &mine, &other] {
            std::fs::write(f, b"partial").unwrap();
        }
        replace_file(&out, b"new").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert!(!dead.exists() || !Path::new("/proc/self").exists());
        assert!(mine.exists() && other.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_is_refused_and_nothing_is_left_behind() {
        let d = scratch("dir");
        let e = replace_file(&d, b"x").expect_err("a directory");
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert!(leftovers(&d).is_empty());
        assert!(leftovers(d.parent().expect("parent")).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn devices_are_refused_and_symlinks_followed() {
        let e = replace_file(Path::new("/dev/null"), b"x").expect_err("a device");
        assert!(e.to_string().contains("character device"), "{e}");
        let d = scratch("link");
        let target = d.join("real.safetensors");
        std::fs::write(&target, b"old").expect("write");
        std::os::unix::fs::symlink(&target, d.join("link.safetensors")).expect("link");
        replace_file(&d.join("link.safetensors"), b"new").expect("followed");
        assert_eq!(std::fs::read(&target).expect("target"), b"new");
        assert!(std::fs::symlink_metadata(d.join("link.safetensors"))
            .expect("link")
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_missing_directory_fails_cleanly() {
        let d = scratch("missing");
        let e = replace_file(&d.join("no/such/dir/out.safetensors"), b"x");
        assert!(e.is_err());
        assert!(leftovers(&d).is_empty());
    }
}
