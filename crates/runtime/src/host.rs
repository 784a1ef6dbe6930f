//! Where communication meets a backend's buffers. Communicators move host `f32`; a backend
//! whose buffers are host memory (the CPU backend) lends them to a collective in place and
//! takes received values over as they are, so communication copies nothing; a device backend
//! copies through the host, and the profile (`HOTSPA_PROFILE=1`) shows those copies as their
//! own row, `copies for communication`.

use std::borrow::Cow;
use std::time::Instant;

use kernels::Backend;

use crate::error::Result;

/// The profile's row for the copies a device backend makes for communication.
pub const COPIES: &str = "copies for communication";

fn record(t0: Option<Instant>) {
    if let Some(t0) = t0 {
        crate::profile::record(COPIES, t0.elapsed().as_secs_f64());
    }
}

fn clock() -> Option<Instant> {
    crate::profile::enabled().then(Instant::now)
}

/// `buf`'s values to send or read: borrowed on a host backend, downloaded on a device.
pub fn view<'a, B: Backend>(be: &B, buf: &'a B::Buffer) -> Result<Cow<'a, [f32]>> {
    if let Some(s) = be.host_slice(buf) {
        return Ok(Cow::Borrowed(s));
    }
    let t0 = clock();
    let host = be.download(buf)?;
    record(t0);
    Ok(Cow::Owned(host))
}

/// Received or computed host values as a buffer: taken over on a host backend, uploaded on a
/// device.
pub fn adopt<B: Backend>(be: &B, host: Vec<f32>) -> Result<B::Buffer> {
    let t0 = clock();
    let out = be.adopt(host)?;
    if be.host_slice(&out).is_none() {
        record(t0);
    }
    Ok(out)
}

/// A buffer its holder is done with, as host values to send or switch: handed over on a host
/// backend, downloaded on a device.
pub fn release_to_host<B: Backend>(be: &B, buf: B::Buffer) -> Result<Vec<f32>> {
    let device = be.host_slice(&buf).is_none();
    let t0 = clock().filter(|_| device);
    let host = be.release_to_host(buf)?;
    record(t0);
    Ok(host)
}

/// Runs `f` on `buf`'s values in place (a collective reducing into it): directly on a host
/// backend; on a device through a host copy written back.
pub fn in_place<B: Backend, T>(
    be: &B,
    buf: &mut B::Buffer,
    f: impl FnOnce(&mut [f32]) -> Result<T>,
) -> Result<T> {
    if let Some(s) = be.host_slice_mut(buf) {
        return f(s);
    }
    let t0 = clock();
    let mut host = be.download(buf)?;
    record(t0);
    let out = f(&mut host)?;
    let t0 = clock();
    let back = be.upload(&host)?;
    be.recycle(std::mem::replace(buf, back));
    record(t0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::CpuBackend;

    #[test]
    fn a_host_backend_lends_its_buffers() {
        let be = CpuBackend::new(1).unwrap();
        let mut buf = be.upload(&[1.0, 2.0]).unwrap();
        let at = buf.as_ptr();
        assert!(matches!(view(&be, &buf).unwrap(), Cow::Borrowed(_)));
        in_place(&be, &mut buf, |h| {
            h[0] = 5.0;
            Ok(())
        })
        .unwrap();
        assert_eq!((buf.as_ptr(), buf[0]), (at, 5.0));
        let v = vec![3.0f32; 4];
        let at = v.as_ptr();
        let adopted = adopt(&be, v).unwrap();
        assert_eq!(adopted.as_ptr(), at);
    }
}
