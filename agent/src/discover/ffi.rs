//! The only `unsafe` in ridge-agent: checking whether a vendor library can be
//! loaded (dlopen through libloading). No symbol is ever called.

/// The libraries the agent may probe; nothing else is ever loaded.
pub const KNOWN_LIBRARIES: &[&str] = &["libnvidia-encode.so.1", "libnvcuvid.so.1", "libva.so.2"];

/// Whether the dynamic loader finds and loads `name` (one of
/// [`KNOWN_LIBRARIES`]). A missing library is a normal `false`.
pub fn library_loads(name: &str) -> bool {
    if !KNOWN_LIBRARIES.contains(&name) {
        return false;
    }
    // SAFETY: loading a library runs its ELF initializers. The names are a
    // fixed list of vendor driver libraries (NVIDIA's encode/decode, libva)
    // whose initializers are made to run inside arbitrary media processes;
    // they are resolved by the system loader from its trusted paths (a bare
    // soname, never a path from input). We call no symbol, and the library
    // is unloaded when the handle drops at the end of this statement.
    let loaded = unsafe { libloading::Library::new(name) };
    loaded.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_are_never_loaded() {
        assert!(!library_loads("libc.so.6"));
        assert!(!library_loads("/tmp/evil.so"));
    }
}
