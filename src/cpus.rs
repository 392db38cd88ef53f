//! CPU lists ("0-3,6") and thread pinning.
//!
//! The kernel's affinity masks are variable-sized bitmaps, so both `allowed_cpus` and
//! `pin_current_thread` build their own masks instead of relying on the fixed 1024-bit `cpu_set_t`:
//! that keeps machines with more than 1024 CPUs working.

use std::io;
use std::mem::size_of;

use libc::c_ulong;

/// One past the highest CPU number accepted anywhere. Linux's own compile-time ceiling (`NR_CPUS`) is
/// 8192; the bound also keeps a list like "0-4000000000" from allocating gigabytes.
pub const MAX_CPUS: usize = 8192;

const WORD_BITS: usize = c_ulong::BITS as usize;

/// Parses "0-3,6" -> [0,1,2,3,6] (sorted, deduped); errors are one line ("bad cpu list \"3-1\": range end before start").
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = |why: String| format!("bad cpu list \"{s}\": {why}");
    if s.trim().is_empty() {
        return Err(bad("no cpus given".to_string()));
    }
    let mut cpus = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(bad("empty entry between commas".to_string()));
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (parse_cpu(a.trim()).map_err(bad)?, parse_cpu(b.trim()).map_err(bad)?),
            None => {
                let c = parse_cpu(item).map_err(bad)?;
                (c, c)
            }
        };
        if last < first {
            return Err(bad("range end before start".to_string()));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn parse_cpu(s: &str) -> Result<usize, String> {
    // `usize::from_str` accepts a leading '+', which is not part of the kernel's cpu-list syntax.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("\"{s}\" is not a cpu number"));
    }
    match s.parse::<usize>() {
        Ok(c) if c < MAX_CPUS => Ok(c),
        _ => Err(format!("cpu {s} is above the highest supported cpu number {}", MAX_CPUS - 1)),
    }
}

/// Formats back in compact form: [0,1,2,3,6] -> "0-3,6".
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        // `end + 1` cannot overflow: a successor exists only when end < usize::MAX.
        while iter.peek().is_some_and(|&next| Some(next) == end.checked_add(1)) {
            end = iter.next().unwrap_or(end);
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
    }
    out
}

/// The cpus this process may run on (libc::sched_getaffinity on pid 0).
///
/// Pid 0 means the calling thread; called from the main thread before any pinning this is the
/// process's affinity (what `taskset`, cgroups' cpusets or Docker's `--cpuset-cpus` allow).
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // Start at the size of glibc's `cpu_set_t` (1024 cpus) and double while the kernel says the mask
    // is too small for its cpu count (EINVAL).
    let mut words = size_of::<libc::cpu_set_t>() / size_of::<c_ulong>();
    loop {
        let mut mask: Vec<c_ulong> = vec![0; words];
        let bytes = words * size_of::<c_ulong>();
        // SAFETY: `mask` is a live, writable, c_ulong-aligned buffer of exactly `bytes` bytes, and
        // `bytes` is what we pass as the set size, so the kernel (and glibc, which zeroes the tail it
        // did not fill) writes only inside it. `cpu_set_t` is itself an array of c_ulong, so the cast
        // pointer is suitably aligned.
        let rc = unsafe { libc::sched_getaffinity(0, bytes, mask.as_mut_ptr().cast::<libc::cpu_set_t>()) };
        if rc == 0 {
            let mut cpus = Vec::new();
            for (w, &word) in mask.iter().enumerate() {
                for bit in 0..WORD_BITS {
                    if word & (1 << bit) != 0 {
                        cpus.push(w * WORD_BITS + bit);
                    }
                }
            }
            return Ok(cpus);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) && words * WORD_BITS < MAX_CPUS {
            words *= 2;
            continue;
        }
        return Err(err);
    }
}

/// Pins the calling thread to `cpu` (sched_setaffinity(0) on the thread), erroring if it fails.
///
/// Fails with `InvalidInput` for a cpu number at or above [`MAX_CPUS`], and with the kernel's error
/// (EINVAL) for a cpu that does not exist or that this process may not use.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= MAX_CPUS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} is above the highest supported cpu number {}", MAX_CPUS - 1),
        ));
    }
    let words = (cpu / WORD_BITS + 1).max(size_of::<libc::cpu_set_t>() / size_of::<c_ulong>());
    let mut mask: Vec<c_ulong> = vec![0; words];
    if let Some(word) = mask.get_mut(cpu / WORD_BITS) {
        *word |= 1 << (cpu % WORD_BITS);
    }
    let bytes = words * size_of::<c_ulong>();
    // SAFETY: `mask` is a live, initialised, c_ulong-aligned buffer of `bytes` bytes and the kernel
    // only reads `bytes` bytes from it. Pid 0 is the calling thread (Linux affinity is per thread),
    // so no other thread is affected.
    let rc = unsafe { libc::sched_setaffinity(0, bytes, mask.as_ptr().cast::<libc::cpu_set_t>()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_lists_and_ranges() {
        assert_eq!(parse_cpu_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("6,0-3").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
        assert_eq!(parse_cpu_list("2-2").unwrap(), vec![2]);
        assert_eq!(parse_cpu_list(" 1 , 3 - 4 ").unwrap(), vec![1, 3, 4]);
        assert_eq!(parse_cpu_list("1,1,0-2").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_cpu_list("8191").unwrap(), vec![8191]);
    }

    #[test]
    fn parse_errors_are_one_line() {
        let cases = [
            ("3-1", "bad cpu list \"3-1\": range end before start"),
            ("", "bad cpu list \"\": no cpus given"),
            ("0,,1", "bad cpu list \"0,,1\": empty entry between commas"),
            ("a", "bad cpu list \"a\": \"a\" is not a cpu number"),
            ("-1", "bad cpu list \"-1\": \"\" is not a cpu number"),
            ("+1", "bad cpu list \"+1\": \"+1\" is not a cpu number"),
            ("1-2-3", "bad cpu list \"1-2-3\": \"2-3\" is not a cpu number"),
            ("0-", "bad cpu list \"0-\": \"\" is not a cpu number"),
            ("8192", "bad cpu list \"8192\": cpu 8192 is above the highest supported cpu number 8191"),
            (
                "0-99999999999999999999999",
                "bad cpu list \"0-99999999999999999999999\": cpu 99999999999999999999999 is above the \
                 highest supported cpu number 8191",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_cpu_list(input).unwrap_err(), want, "input {input:?}");
        }
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(format_cpu_list(&[4]), "4");
        assert_eq!(format_cpu_list(&[0, 1]), "0-1");
        assert_eq!(format_cpu_list(&[6, 0, 2, 1, 2]), "0-2,6");
        assert_eq!(format_cpu_list(&[1, 3, 5]), "1,3,5");
        assert_eq!(
            format_cpu_list(&[usize::MAX - 1, usize::MAX]),
            format!("{}-{}", usize::MAX - 1, usize::MAX)
        );
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(cpus in proptest::collection::vec(0usize..MAX_CPUS, 1..64)) {
            let mut want = cpus.clone();
            want.sort_unstable();
            want.dedup();
            let text = format_cpu_list(&cpus);
            prop_assert_eq!(parse_cpu_list(&text).unwrap(), want.clone());
            // The compact form is canonical: formatting the parsed list gives the same text.
            prop_assert_eq!(format_cpu_list(&want), text);
        }

        #[test]
        fn parse_never_panics(s in "[0-9,\\- ]{0,20}") {
            let _ = parse_cpu_list(&s);
        }
    }

    #[test]
    fn allowed_cpus_is_nonempty_and_sorted() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn pinned_thread_reports_that_cpu() {
        let allowed = allowed_cpus().unwrap();
        // The last allowed cpu, so that on a machine with several cpus the result differs from cpu 0.
        let cpu = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(cpu).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![cpu]);
        // Pinning is per thread: this thread's mask is untouched.
        assert_eq!(allowed_cpus().unwrap(), allowed);
    }

    #[test]
    fn pinning_to_an_unusable_cpu_fails() {
        let err = std::thread::spawn(|| pin_current_thread(MAX_CPUS)).join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let allowed = allowed_cpus().unwrap();
        if let Some(unusable) = (0..MAX_CPUS).find(|c| !allowed.contains(c)) {
            let err = std::thread::spawn(move || pin_current_thread(unusable)).join().unwrap().unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        }
    }
}
