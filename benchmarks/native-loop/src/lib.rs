//! One ranged GET's body, read from the socket, hashed per chunk with BLAKE3 and written
//! with pwrite in slices, all without the GIL: what the checkout's loop would cost with no
//! Python per buffer. The caller sends the request and reads the headers (http.client)
//! and passes what its buffered reader already holds of the body as `prefix`.

use pyo3::exceptions::{PyOSError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::cell::RefCell;

thread_local! {
    // one buffer per thread, reused: the checkout's workers each keep theirs
    static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::new());
}

enum Fail {
    Os(i32),
    Timeout,
    Cut,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Some bytes from a non-blocking socket (Python's sockets with a timeout are), waiting
/// at most `timeout_ms` for each.
fn recv_some(sock: i32, buf: &mut [u8], timeout_ms: i32) -> Result<usize, Fail> {
    loop {
        let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            return Ok(n as usize);
        }
        if n == 0 {
            return Err(Fail::Cut);
        }
        let e = errno();
        if e == libc::EINTR {
            continue;
        }
        if e != libc::EAGAIN && e != libc::EWOULDBLOCK {
            return Err(Fail::Os(e));
        }
        let mut p = libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 };
        match unsafe { libc::poll(&mut p, 1, timeout_ms) } {
            0 => return Err(Fail::Timeout),
            r if r < 0 && errno() != libc::EINTR => return Err(Fail::Os(errno())),
            _ => {}
        }
    }
}

/// `data` written at `offset` in writes of at most `slice` bytes, short writes resumed.
fn place(fd: i32, data: &[u8], offset: u64, slice: usize) -> Result<(), Fail> {
    let mut done = 0;
    while done < data.len() {
        let end = (done + slice).min(data.len());
        let at = (offset + done as u64) as libc::off_t;
        let n = unsafe { libc::pwrite(fd, data[done..end].as_ptr().cast(), end - done, at) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(Fail::Os(libc::EIO)),
            _ if errno() == libc::EINTR => {}
            _ => return Err(Fail::Os(errno())),
        }
    }
    Ok(())
}

/// Receive `length` bytes; each whole chunk, as soon as it is in, is hashed and written
/// (`out` < 0: received only). The chunks' digests, concatenated.
#[allow(clippy::too_many_arguments)]
fn run(
    sock: i32, timeout_ms: i32, prefix: &[u8], out: i32, offset: u64, length: usize,
    chunk: usize, slice: usize,
) -> Result<Vec<u8>, Fail> {
    BUF.with(|cell| {
        let mut owned = cell.borrow_mut();
        if owned.len() < length {
            owned.resize(length, 0);
        }
        let buf = &mut owned[..length];
        let mut got = prefix.len().min(length);
        buf[..got].copy_from_slice(&prefix[..got]);
        let mut done = 0;
        let mut digests = Vec::with_capacity((length / chunk + 1) * 32);
        while done < length {
            if got < length {
                got += recv_some(sock, &mut buf[got..], timeout_ms)?;
            }
            let ready = if got == length { length } else { got - (got - done) % chunk };
            while done < ready {
                let end = (done + chunk).min(ready);
                if out >= 0 {
                    digests.extend_from_slice(blake3::hash(&buf[done..end]).as_bytes());
                    place(out, &buf[done..end], offset + done as u64, slice)?;
                }
                done = end;
            }
        }
        Ok(digests)
    })
}

/// receive(sock_fd, timeout_ms, prefix, out_fd, offset, length, chunk, slice) -> digests
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn receive(
    py: Python<'_>, sock: i32, timeout_ms: i32, prefix: &[u8], out: i32, offset: u64,
    length: usize, chunk: usize, slice: usize,
) -> PyResult<PyObject> {
    let prefix = prefix.to_vec();
    let done = py.allow_threads(|| run(sock, timeout_ms, &prefix, out, offset, length, chunk, slice));
    match done {
        Ok(d) => Ok(PyBytes::new(py, &d).into()),
        Err(Fail::Timeout) => Err(PyTimeoutError::new_err("the body stalled")),
        Err(Fail::Cut) => Err(PyOSError::new_err("the connection closed mid-body")),
        Err(Fail::Os(e)) => Err(PyOSError::new_err(std::io::Error::from_raw_os_error(e).to_string())),
    }
}

#[pymodule]
fn native_loop(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(receive, m)?)?;
    Ok(())
}
