//! The burn backends this binary was built with (cargo features `cuda`, `wgpu`, `ndarray`,
//! `flex`) and the `--backend` choice among them. Without `--backend` the first compiled
//! in this order runs: cuda, wgpu, ndarray, flex.

use std::fmt;

#[cfg(not(any(
    feature = "flex",
    feature = "ndarray",
    feature = "wgpu",
    feature = "cuda"
)))]
compile_error!("enable one backend feature: flex (default), ndarray, wgpu or cuda");

/// A burn backend legora can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NVIDIA GPUs through CubeCL's CUDA runtime.
    Cuda,
    /// Vulkan / Metal / DirectX 12 / WebGPU devices through wgpu.
    Wgpu,
    /// The portable CPU backend.
    NdArray,
    /// The CPU backend with legora's fused kernels.
    Flex,
}

impl Kind {
    /// Every backend, in the default order of preference.
    pub const ALL: [Kind; 4] = [Kind::Cuda, Kind::Wgpu, Kind::NdArray, Kind::Flex];

    /// The flag value (and cargo feature) naming the backend.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cuda => "cuda",
            Kind::Wgpu => "wgpu",
            Kind::NdArray => "ndarray",
            Kind::Flex => "flex",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn compiled(self) -> bool {
        match self {
            Kind::Cuda => cfg!(feature = "cuda"),
            Kind::Wgpu => cfg!(feature = "wgpu"),
            Kind::NdArray => cfg!(feature = "ndarray"),
            Kind::Flex => cfg!(feature = "flex"),
        }
    }

    /// The backends compiled into this binary, in the default order.
    pub fn compiled_ones() -> Vec<Kind> {
        Kind::ALL.into_iter().filter(|k| k.compiled()).collect()
    }

    /// The backend used without `--backend`: the first compiled one.
    pub fn default_compiled() -> Kind {
        Kind::compiled_ones()[0]
    }

    /// The backend `--backend NAME` asks for: a known name compiled into this binary.
    pub fn parse(name: &str) -> Result<Kind, String> {
        let compiled = Kind::compiled_ones()
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ");
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == name) else {
            return Err(format!(
                "unknown backend `{name}`: expected one of cuda, wgpu, ndarray, flex \
                 (this binary has {compiled})"
            ));
        };
        if !kind.compiled() {
            return Err(format!(
                "backend `{name}` is not compiled into this binary (it has {compiled}; \
                 build with `--features {name}`)"
            ));
        }
        Ok(kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Calls the generic function `path::<B>(args…)` with `B` the burn backend of `kind`
/// (a [`Kind`] compiled into this binary, as [`Kind::parse`] guarantees).
macro_rules! on_backend {
    ($kind:expr, $($f:ident)::+ ($($arg:expr),* $(,)?)) => {
        match $kind {
            #[cfg(feature = "cuda")]
            $crate::backend::Kind::Cuda => $($f)::+::<legora::backend::Cuda>($($arg),*),
            #[cfg(feature = "wgpu")]
            $crate::backend::Kind::Wgpu => $($f)::+::<legora::backend::Wgpu>($($arg),*),
            #[cfg(feature = "ndarray")]
            $crate::backend::Kind::NdArray => $($f)::+::<legora::backend::NdArray>($($arg),*),
            #[cfg(feature = "flex")]
            $crate::backend::Kind::Flex => $($f)::+::<legora::backend::Flex>($($arg),*),
            #[allow(unreachable_patterns)]
            other => unreachable!("backend {other} is not compiled in (checked by Kind::parse)"),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::Kind;

    #[test]
    fn the_default_build_has_flex_and_refuses_the_others_by_name() {
        assert!(Kind::compiled_ones().contains(&Kind::Flex));
        assert_eq!(Kind::parse("flex"), Ok(Kind::Flex));
        for kind in Kind::ALL.into_iter().filter(|k| !k.compiled()) {
            let e = Kind::parse(kind.name()).unwrap_err();
            assert!(e.contains("not compiled into this binary"), "{e}");
            assert!(e.contains("flex") && e.contains(kind.name()), "{e}");
        }
        let e = Kind::parse("metal").unwrap_err();
        assert!(
            e.contains("unknown backend `metal`") && e.contains("flex"),
            "{e}"
        );
    }

    #[test]
    fn on_backend_runs_the_chosen_backend() {
        fn name<B: burn::tensor::backend::Backend>(tag: &str) -> String {
            format!("{tag} {}", B::name(&Default::default()))
        }
        let got = on_backend!(Kind::Flex, name("ran"));
        assert!(got.starts_with("ran ") && got.contains("flex"), "{got}");
    }
}
