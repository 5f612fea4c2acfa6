//! Reading a [`SecretRef`]: every process that needs a forge token or webhook secret
//! (waker, provisioner) reads it the same way, when it needs it, so the store never holds
//! one and a rotated file or variable takes effect without a restart.

use wakegate_core::route::SecretRef;

/// Longest secret read from a file.
const MAX_SECRET: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    #[error("cannot read secret file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {0} is empty")]
    Empty(String),
}

/// The secret's value, trimmed; never logged.
pub fn resolve(secret: &SecretRef) -> Result<String, SecretError> {
    let (value, name) = match secret {
        SecretRef::Env(name) => (std::env::var(name).map_err(|_| SecretError::MissingEnv(name.clone()))?, name),
        SecretRef::File(path) => {
            use std::io::Read;
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_SECRET).read_to_string(&mut text))
                .map_err(|source| SecretError::File { path: path.clone(), source })?;
            (text, path)
        }
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err(SecretError::Empty(name.clone()));
    }
    Ok(value)
}

/// Checks a reference's shape (not its value, which may be provided later): an
/// environment variable name of `[A-Za-z_][A-Za-z0-9_]*`, or an absolute file path.
pub fn check(secret: &SecretRef) -> Result<(), String> {
    match secret {
        SecretRef::Env(name) => {
            let ok = name.len() <= 128
                && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            ok.then_some(()).ok_or_else(|| "an environment variable name is letters, digits and '_'".to_string())
        }
        SecretRef::File(path) => {
            let ok = path.starts_with('/') && path.len() <= 4096 && !path.chars().any(char::is_control);
            ok.then_some(()).ok_or_else(|| "a secret file is an absolute path".to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_trimmed_and_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("wakegate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "glpat-abc\n").unwrap();
        let path = file.to_string_lossy().into_owned();
        assert_eq!(resolve(&SecretRef::File(path.clone())).unwrap(), "glpat-abc");
        std::fs::write(&file, "  \n").unwrap();
        assert!(matches!(resolve(&SecretRef::File(path)), Err(SecretError::Empty(_))));
        let missing = resolve(&SecretRef::Env("WAKEGATE_TEST_SURELY_UNSET_SECRET".into())).unwrap_err();
        assert!(missing.to_string().contains("WAKEGATE_TEST_SURELY_UNSET_SECRET"));
        assert!(check(&SecretRef::Env("GITLAB_TOKEN".into())).is_ok());
        assert!(check(&SecretRef::Env("BAD NAME".into())).is_err());
        assert!(check(&SecretRef::File("relative/path".into())).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
