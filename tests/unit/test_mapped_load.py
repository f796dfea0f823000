"""The safe loader's memory-mapped reads (load_file(..., mmap=True)), which a reshard uses to read
only the pieces of the saved shards a rank holds: the same values as a whole read, and the same
refusals: a file whose tensors claim more bytes than it stores, and a pickle that would run code."""

import os
import pickle
import struct
import zipfile

import pytest
import torch

from s2moe_ds.checkpoint.safe_load import UnsafeCheckpointError, load_file
from s2moe_ds.config import ConfigError


def test_a_mapped_read_gives_the_values_of_a_whole_read(tmp_path):
    path = str(tmp_path / "shard.pt")
    saved = {"flat": [torch.randn(1000), torch.arange(7)], "step": torch.tensor(3.0), "note": "x"}
    torch.save(saved, path)
    mapped, whole = load_file(path, mmap=True), load_file(path)
    assert mapped["note"] == whole["note"] == "x" and mapped["step"].item() == 3.0
    for a, b in zip(mapped["flat"], whole["flat"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _claiming_more(path, numel):
    """A copy of a one-tensor file of 10 floats whose pickle says the tensor holds `numel`."""
    good = path + ".good"
    torch.save({"w": torch.arange(10, dtype=torch.float32)}, good)
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = z.read(info.filename)
            if info.filename.endswith("data.pkl"):
                big = b"J" + struct.pack("<i", numel)
                assert data.count(b"K\n") == 2  # the storage's element count and the view's size
                data = data.replace(b"K\n", big)
            out.writestr(info, data)
    os.remove(good)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_tensor_larger_than_its_record_is_refused_naming_the_file(tmp_path, mmap):
    path = str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _claiming_more(path, 100_000)
    with pytest.raises(ConfigError, match=r"checkpoint file .*zero_pp_rank_0_mp_rank_00_optim_states\.pt: cannot "
                                          r"be read .*truncated, damaged or no torch file"):
        load_file(path, mmap=mmap)


class Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_mapped_read_refuses_a_pickle_that_would_run_code(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(3), "x": Payload()}, path, pickle_module=pickle)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused to unpickle it: its pickle asks for "
                                                    r"(posix|nt)\.system"):
        load_file(path, mmap=True)
