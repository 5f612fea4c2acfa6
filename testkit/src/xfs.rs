//! An XFS filesystem made with reflink in a sparse file, on a loop device, mounted for
//! a test or a benchmark and taken down when dropped (root only; `Err` says why not).

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// An XFS filesystem (with reflink) in a file, on a loop device, mounted for the test.
pub struct Xfs {
    file: PathBuf,
    /// Where it is mounted.
    pub mount: PathBuf,
    device: String,
}

impl Xfs {
    /// `Err` says why this machine cannot (not root, no loop devices, no mkfs.xfs).
    pub fn make(bytes: u64) -> Result<Xfs, String> {
        let run = |cmd: &mut Command| -> Result<String, String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let dir = crate::tempdir("xfs");
        let file = dir.join("xfs.img");
        std::fs::File::create(&file).and_then(|f| f.set_len(bytes)).map_err(|e| e.to_string())?;
        run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&file))?;
        let device = run(Command::new("losetup").args(["-f", "--show"]).arg(&file))?;
        let mount = dir.join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let x = Xfs { file, mount, device };
        run(Command::new("mount").arg(&x.device).arg(&x.mount))?;
        Ok(x)
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // the processes killed at the world's end may take a moment to let go of it
        for _ in 0..100 {
            if Command::new("umount").arg(&self.mount).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // a loop device the kernel already let go of (autoclear) is no failure
        if let Err(e) = Command::new("losetup").args(["-d", &self.device]).stderr(Stdio::null()).status() {
            eprintln!("losetup -d {}: {e}", self.device);
        }
        if let Err(e) = std::fs::remove_file(&self.file) {
            eprintln!("could not remove {}: {e}", self.file.display());
        }
    }
}
