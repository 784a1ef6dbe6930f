//! NCCL (DESIGN §4: "NCCL behind a feature"). With the cargo feature `nccl`, [`NcclComm`]
//! implements [`Communicator`](crate::Communicator) over NCCL, loaded at run time
//! (`libnccl.so.2`, or `$HOTSPA_NCCL_LIBRARY`); the unique id travels over the MPI world under
//! `mpirun` ([`NcclComm::from_world`]), else over the TCP [`rendezvous`], where a rank must
//! prove the job's secret (`HOTSPA_NCCL_SECRET`) first. Without the feature the type
//! exists and every constructor returns [`CommError::Unavailable`](crate::CommError).

pub mod rendezvous;

#[cfg(feature = "nccl")]
mod device;
#[cfg(feature = "nccl")]
pub use device::{unique_id, NcclComm};

#[cfg(not(feature = "nccl"))]
mod stub {
    use crate::error::{CommError, Result};
    use crate::nccl::rendezvous::ID_BYTES;

    fn unavailable() -> CommError {
        CommError::Unavailable(
            "this hotspa was built without the `nccl` feature (rebuild with --features nccl)"
                .into(),
        )
    }

    /// Always an error in this build.
    pub fn unique_id() -> Result<[u8; ID_BYTES]> {
        Err(unavailable())
    }

    enum Never {}

    /// The NCCL communicator; no constructor succeeds in this build.
    pub struct NcclComm(Never);

    crate::communicator::uninhabited_communicator!(NcclComm);

    impl NcclComm {
        /// Always an error in this build.
        pub fn init(
            _id: [u8; ID_BYTES],
            _rank: usize,
            _size: usize,
            _device: usize,
        ) -> Result<Self> {
            Err(unavailable())
        }
        /// Always an error in this build.
        pub fn single(_device: usize) -> Result<Self> {
            Err(unavailable())
        }
        /// Always an error in this build.
        pub fn from_env() -> Result<Self> {
            Err(unavailable())
        }
        /// Always an error in this build.
        pub fn from_world(_world: &dyn crate::Communicator) -> Result<Self> {
            Err(unavailable())
        }
    }
}
#[cfg(not(feature = "nccl"))]
pub use stub::{unique_id, NcclComm};
