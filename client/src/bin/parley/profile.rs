//! Saved credentials: one `<user>.json` per user in the profile directory, mode 0600.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use parley_client::Credentials;

/// The directory holding saved credentials.
pub struct ProfileDir {
    dir: PathBuf,
}

impl ProfileDir {
    /// `explicit` if given, else `$HOME/.parley`.
    pub fn resolve(explicit: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = match explicit {
            Some(dir) => dir,
            None => {
                let home = std::env::var_os("HOME")
                    .context("HOME is not set: pass --profile-dir or set PARLEY_HOME")?;
                PathBuf::from(home).join(".parley")
            }
        };
        Ok(Self { dir })
    }

    /// The file of a user's credentials.
    pub fn path(&self, user: &str) -> anyhow::Result<PathBuf> {
        let valid = !user.is_empty()
            && !user.starts_with('.')
            && user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            bail!("{user:?} is not a valid user id ([a-z0-9_.-], not starting with '.')");
        }
        Ok(self.dir.join(format!("{user}.json")))
    }

    /// Loads a user's credentials.
    pub fn load(&self, user: &str) -> anyhow::Result<Credentials> {
        let path = self.path(user)?;
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no credentials for {user} in {}: run `parley register {user}` first",
                self.dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// Saves a user's credentials (atomically, readable by the owner only); returns the path.
    pub fn save(&self, credentials: &Credentials) -> anyhow::Result<PathBuf> {
        let path = self.path(&credentials.user_id)?;
        create_private_dir(&self.dir)?;
        let tmp = path.with_extension("json.tmp");
        let json =
            serde_json::to_string_pretty(credentials).context("cannot encode credentials")?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        // The mode above only applies to a new file.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", tmp.display()))?;
        file.write_all(json.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(path)
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(user: &str) -> Credentials {
        Credentials {
            user_id: user.into(),
            device_id: "cli".into(),
            device_secret: "secret".into(),
            token: "token".into(),
            token_expires_at_ms: 1,
        }
    }

    #[test]
    fn save_and_load_round_trip_with_private_mode() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let profiles = ProfileDir::resolve(Some(tmp.path().join("profiles")))?;
        let path = profiles.save(&credentials("alice"))?;
        let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(profiles.load("alice")?, credentials("alice"));
        let mut newer = credentials("alice");
        newer.token = "fresh".into();
        profiles.save(&newer)?;
        assert_eq!(profiles.load("alice")?.token, "fresh");
        let missing = profiles.load("bob").unwrap_err().to_string();
        assert!(missing.contains("parley register bob"), "{missing}");
        Ok(())
    }

    #[test]
    fn user_ids_cannot_escape_the_directory() -> anyhow::Result<()> {
        let profiles = ProfileDir::resolve(Some(PathBuf::from("/p")))?;
        assert_eq!(profiles.path("a.b-c_1")?, PathBuf::from("/p/a.b-c_1.json"));
        for bad in ["", "..", ".hidden", "a/b", "a b"] {
            assert!(profiles.path(bad).is_err(), "{bad:?}");
        }
        Ok(())
    }
}
