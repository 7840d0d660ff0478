//! Parsing `--from SRC` into a [`Source`].

use std::path::Path;

use super::sniff::{check_kind, describe, read_head, sniff};
use super::{ArchiveKind, FetchError, Source};

/// Parses SRC, as given to `zdtctl deploy --from SRC`.
///
/// - `git+URL#REF` → [`Source::Git`]; `REF` defaults to `HEAD`. A relative
///   local path in `URL` is resolved against `base`.
/// - An existing folder → [`Source::Dir`].
/// - A file named `*.tar`, `*.tar.gz`, `*.tgz` or `*.zip` (any case) →
///   [`Source::Archive`], after checking that its first bytes match the name.
///
/// Relative paths are resolved against `base`, the client's working folder.
pub fn parse_source(src: &str, base: &Path) -> Result<Source, FetchError> {
    if let Some(rest) = src.strip_prefix("git+") {
        return parse_git(src, rest, base);
    }
    let path = base.join(src);
    let meta = std::fs::metadata(&path).map_err(|source| FetchError::Read {
        path: path.clone(),
        source,
    })?;
    if meta.is_dir() {
        return Ok(Source::Dir(path));
    }
    let head = read_head(&path)?;
    let Some(kind) = kind_by_name(&path) else {
        let problem = match sniff(&head) {
            Some(kind) => format!(
                "its content looks like a {kind} archive; name it {}",
                suffix(kind)
            ),
            None => format!(
                "{} (archives must be named .tar, .tar.gz, .tgz or .zip)",
                describe(&head)
            ),
        };
        return Err(FetchError::NotASource { path, problem });
    };
    check_kind(&path, kind, &head)?;
    Ok(Source::Archive { path, kind })
}

fn parse_git(src: &str, rest: &str, base: &Path) -> Result<Source, FetchError> {
    let bad = |problem: &str| FetchError::Git {
        source_text: src.to_string(),
        problem: problem.to_string(),
    };
    let (url, reference) = match rest.split_once('#') {
        Some((url, reference)) => (url, reference),
        None => (rest, "HEAD"),
    };
    if url.is_empty() {
        return Err(bad("the URL is empty"));
    }
    if reference.is_empty() {
        return Err(bad("the ref after '#' is empty"));
    }
    // Both end up as git arguments: a leading '-' would be read as an option.
    if url.starts_with('-') || reference.starts_with('-') {
        return Err(bad("the URL and the ref must not start with '-'"));
    }
    if reference.contains("..")
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad(
            "the ref must not contain '..', spaces or control characters",
        ));
    }
    if url.chars().any(char::is_control) {
        return Err(bad("the URL must not contain control characters"));
    }
    let url = if let Some((scheme, _)) = url.split_once("://") {
        if !matches!(scheme, "https" | "http" | "ssh" | "git" | "file") {
            return Err(bad(&format!(
                "unsupported scheme {scheme:?} (use https, http, ssh, git or file)"
            )));
        }
        url.to_string()
    } else if url.contains("::") {
        // git's remote helpers (`ext::`, `fd::`) run commands.
        return Err(bad("remote helpers (TRANSPORT::ADDRESS) are not allowed"));
    } else if is_scp_like(url) {
        url.to_string()
    } else {
        base.join(url).to_string_lossy().into_owned()
    };
    Ok(Source::Git {
        url,
        reference: reference.to_string(),
    })
}

/// `user@host:path` or `host:path`, as git reads it: a ':' before any '/'.
fn is_scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The archive format a file's name says (`.tar`, `.tar.gz`, `.tgz`,
/// `.zip`, any case), or None.
pub fn kind_by_name(path: &Path) -> Option<ArchiveKind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(ArchiveKind::TarGz)
    } else if name.ends_with(".tar") {
        Some(ArchiveKind::Tar)
    } else if name.ends_with(".zip") {
        Some(ArchiveKind::Zip)
    } else {
        None
    }
}

fn suffix(kind: ArchiveKind) -> &'static str {
    match kind {
        ArchiveKind::Tar => ".tar",
        ArchiveKind::TarGz => ".tar.gz",
        ArchiveKind::Zip => ".zip",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(src: &str) -> (String, String) {
        match parse_source(src, Path::new("/home/me/app")) {
            Ok(Source::Git { url, reference }) => (url, reference),
            other => panic!("{src}: {other:?}"),
        }
    }

    fn git_error(src: &str) -> String {
        parse_source(src, Path::new("/"))
            .expect_err(src)
            .to_string()
    }

    #[test]
    fn git_sources() {
        let cases = [
            (
                "git+file:///srv/repo.git#main",
                "file:///srv/repo.git",
                "main",
            ),
            ("git+/srv/repo#v1.2", "/srv/repo", "v1.2"),
            ("git+https://h/x.git", "https://h/x.git", "HEAD"),
            (
                "git+ssh://git@h/x.git#0a1b2c",
                "ssh://git@h/x.git",
                "0a1b2c",
            ),
            (
                "git+git@github.com:org/x.git#release/2",
                "git@github.com:org/x.git",
                "release/2",
            ),
            ("git+../repo#main", "/home/me/app/../repo", "main"),
        ];
        for (src, url, reference) in cases {
            assert_eq!(git(src), (url.to_string(), reference.to_string()), "{src}");
        }
    }

    #[test]
    fn bad_git_sources_say_why() {
        assert!(git_error("git+#main").contains("the URL is empty"));
        assert!(git_error("git+https://h/x.git#").contains("the ref after '#' is empty"));
        assert!(
            git_error("git+https://h/x.git#--upload-pack=evil").contains("must not start with '-'")
        );
        assert!(git_error("git+-oProxyCommand=evil#main").contains("must not start with '-'"));
        assert!(git_error("git+ext::sh -c evil#main").contains("remote helpers"));
        assert!(git_error("git+ftp://h/x.git").contains("unsupported scheme \"ftp\""));
        let e = git_error("git+https://h/x.git#a b");
        assert!(
            e.starts_with("bad git source \"git+https://h/x.git#a b\": the ref must not contain"),
            "{e}"
        );
        assert!(e.ends_with("git+/srv/app.git#v1.2)"), "{e}");
    }

    #[test]
    fn folders_and_archives_relative_to_base() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("app")).expect("mkdir");
        assert_eq!(
            parse_source("app", tmp.path()).expect("dir"),
            Source::Dir(tmp.path().join("app"))
        );
        let mut gz = vec![0x1f, 0x8b, 8, 0];
        gz.resize(64, 0);
        let mut zip = b"PK\x03\x04".to_vec();
        zip.resize(64, 0);
        let mut tar = tar::Header::new_ustar();
        tar.set_path("a").expect("path");
        tar.set_cksum();
        for (name, content, kind) in [
            ("a.tar.gz", &gz[..], ArchiveKind::TarGz),
            ("A.TGZ", &gz[..], ArchiveKind::TarGz),
            ("a.zip", &zip[..], ArchiveKind::Zip),
            ("a.tar", tar.as_bytes(), ArchiveKind::Tar),
        ] {
            std::fs::write(tmp.path().join(name), content).expect("write");
            let path = tmp.path().join(name);
            assert_eq!(
                parse_source(name, tmp.path()).expect(name),
                Source::Archive { path, kind }
            );
        }
    }

    #[test]
    fn misnamed_missing_and_unknown_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("app.tar.gz"), "<html>Not Found</html>\n").expect("write");
        let e = parse_source("app.tar.gz", tmp.path())
            .expect_err("text")
            .to_string();
        let want = format!(
            "{}/app.tar.gz is named like a gzip-compressed tar archive, but it holds text: \"<html>Not Found</html>\\n\"",
            tmp.path().display()
        );
        assert_eq!(e, want);
        std::fs::write(tmp.path().join("app.zip"), [0x1f, 0x8b, 8, 0]).expect("write");
        let e = parse_source("app.zip", tmp.path())
            .expect_err("gzip")
            .to_string();
        assert!(
            e.ends_with(
                "named like a zip archive, but its content is a gzip-compressed tar archive"
            ),
            "{e}"
        );
        std::fs::write(tmp.path().join("app.tar"), b"\xfd7zXZ\0rest").expect("write");
        let e = parse_source("app.tar", tmp.path())
            .expect_err("xz")
            .to_string();
        assert!(
            e.ends_with("it is xz-compressed, which zdt does not read (use .tar.gz or .zip)"),
            "{e}"
        );

        let e = parse_source("gone/app.tgz", tmp.path())
            .expect_err("missing")
            .to_string();
        let want = format!(
            "cannot read {}/gone/app.tgz: No such file or directory (os error 2)",
            tmp.path().display()
        );
        assert_eq!(e, want);

        std::fs::write(tmp.path().join("release.bin"), [0x1f, 0x8b, 8, 0]).expect("write");
        let e = parse_source("release.bin", tmp.path())
            .expect_err("unknown")
            .to_string();
        assert!(e.ends_with("neither a folder nor an archive: its content looks like a gzip-compressed tar archive; name it .tar.gz"), "{e}");
    }
}
