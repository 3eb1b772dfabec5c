# What the codec kernels (_blocks, _chunks) share, compiled into each of them
# as cdef inline functions: big-endian integers of 1 to 8 bytes, the bits of a
# double, the block size limit and the bytes a kernel accepts. The twin of
# these is _shared_py.py.
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

# The most readings a block (or a hot row's merged readings) holds; the twin's
# MAX_COUNT is the same number, and _blocks exports this one as MAX_COUNT.
cdef enum:
    MAX_COUNT = 16777216  # 1 << 24


cdef inline uint64_t get_be(const unsigned char* p, int w) noexcept nogil:
    cdef uint64_t x = 0
    cdef int j
    for j in range(w):
        x = (x << 8) | p[j]
    return x


cdef inline void put_be(unsigned char* p, uint64_t x, int w) noexcept nogil:
    cdef int j
    for j in range(w - 1, -1, -1):
        p[j] = x & 0xff
        x >>= 8


cdef inline uint64_t to_bits(double x) noexcept nogil:
    cdef uint64_t b
    memcpy(&b, &x, 8)
    return b


cdef inline double from_bits(uint64_t b) noexcept nogil:
    cdef double x
    memcpy(&x, &b, 8)
    return x


cdef inline int check_count(Py_ssize_t n) except -1:
    if n > MAX_COUNT:
        raise ValueError(f"a block holds at most {<Py_ssize_t>MAX_COUNT:,} readings, got {n:,}; "
                         "compact into smaller blocks")
    return 0


cdef inline const unsigned char[::1] as_bytes(object data, str what):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")
    # A memoryview may be strided or of another item format: bytes() flattens it.
    return bytes(data) if isinstance(data, memoryview) else data
