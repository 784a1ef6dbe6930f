//! MPI: one rank per process, launched by `mpirun`. With the cargo feature `mpi`, [`MpiComm`]
//! implements [`Communicator`](crate::Communicator) over the system MPI (the `mpi` crate; Debian's
//! OpenMPI here) with the same ring algorithms as `ThreadComm`, so a run gives bitwise the same
//! numbers under either. Without the feature the type exists, [`launch`] still recognises an
//! `mpirun` launch from its environment, and [`MpiComm::init`] says how to get the feature.

#[cfg(feature = "mpi")]
mod process;
#[cfg(feature = "mpi")]
pub use process::MpiComm;

/// An MPI launch seen from the environment `mpirun` sets (Open MPI, MPICH/Hydra, PMIx, Slurm's
/// PMI): `(rank, size)`, or `None` when this process was not started by an MPI launcher.
pub fn launch() -> Option<(usize, usize)> {
    let get = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ]
    .iter()
    .find_map(|(r, s)| Some((get(r)?, get(s)?)))
}

#[cfg(not(feature = "mpi"))]
mod stub {
    use crate::error::{CommError, Result};

    enum Never {}

    /// The MPI communicator; [`MpiComm::init`] fails in this build.
    pub struct MpiComm(Never);

    impl MpiComm {
        /// Always an error in this build.
        pub fn init() -> Result<MpiComm> {
            Err(CommError::Unavailable(
                "this hotspa was built without the `mpi` feature (rebuild with `cargo build \
                 --release --features hotspa/mpi`; it needs an MPI library, e.g. Debian's \
                 libopenmpi-dev, and libclang)"
                    .into(),
            ))
        }

        /// The node of every world rank (never called in this build).
        pub fn nodes(&self) -> &[usize] {
            match self.0 {}
        }

        /// Ends every process of the job (never called in this build).
        pub fn abort(&self, _code: i32) -> ! {
            match self.0 {}
        }
    }

    crate::communicator::uninhabited_communicator!(MpiComm);
}
#[cfg(not(feature = "mpi"))]
pub use stub::MpiComm;
