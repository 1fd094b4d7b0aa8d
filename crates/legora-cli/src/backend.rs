//! The burn backend this binary was built with (cargo features `cuda`, `wgpu`, `ndarray`,
//! `flex`; the first one compiled in wins).

#[cfg(feature = "cuda")]
pub type Backend = legora::backend::Cuda;

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type Backend = legora::backend::Wgpu;

#[cfg(all(feature = "ndarray", not(any(feature = "cuda", feature = "wgpu"))))]
pub type Backend = legora::backend::NdArray;

#[cfg(all(
    feature = "flex",
    not(any(feature = "cuda", feature = "wgpu", feature = "ndarray"))
))]
pub type Backend = legora::backend::Flex;

#[cfg(not(any(
    feature = "flex",
    feature = "ndarray",
    feature = "wgpu",
    feature = "cuda"
)))]
compile_error!("enable one backend feature: flex (default), ndarray, wgpu or cuda");

/// The name of [`Backend`] (`cuda`, `wgpu`, `ndarray` or `flex`), for reports.
pub const NAME: &str = if cfg!(feature = "cuda") {
    "cuda"
} else if cfg!(feature = "wgpu") {
    "wgpu"
} else if cfg!(feature = "ndarray") {
    "ndarray"
} else {
    "flex"
};

/// [`Backend`] with autodiff, for training.
pub type TrainBackend = legora::backend::Autodiff<Backend>;

/// The default device of [`Backend`].
pub fn device() -> burn::tensor::Device<Backend> {
    Default::default()
}
