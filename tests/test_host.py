"""diloco_jax/host.py: the machine facts a run's summary.json records, read from hand-written
/proc/cpuinfo text (x86 with and without AVX-512, Arm, nothing) and from this machine."""

import platform

import jax

from diloco_jax import host

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 sse4_2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 sse4_2 avx avx2 fma avx512f
"""
AVX512 = "model name\t: Intel(R) Xeon(R)\nflags\t\t: sse4_2 avx avx2 avx512f avx512bw\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes sha1\n"


def test_cpu_facts_from_cpuinfo_text():
  # The first processor's lines decide (a later one's avx512f does not count).
  assert host.cpu_facts(X86) == {"cpu": "AMD EPYC 7B13", "vector_isa": "avx2"}
  assert host.cpu_facts(AVX512) == {"cpu": "Intel(R) Xeon(R)", "vector_isa": "avx512f"}
  assert host.cpu_facts(ARM) == {"cpu": None, "vector_isa": "asimd"}
  assert host.cpu_facts("") == {"cpu": None, "vector_isa": None}


def test_describe_this_machine():
  facts = host.describe()
  assert set(facts) == {"cpu", "vector_isa", "machine", "cpus", "jax", "jaxlib", "backend",
                        "device_kind"}
  assert facts["jax"] == jax.__version__ and facts["backend"] == jax.default_backend()
  assert facts["machine"] == platform.machine()
  assert facts["vector_isa"] in host.VECTOR_ISAS + (None,)
