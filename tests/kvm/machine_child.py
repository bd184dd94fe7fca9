"""Child-process half of test_machine.test_state_restored_in_another_process."""

from pathlib import Path

from kemari_agent.kvm.machine import EXIT_IO, Machine


def finish(d: Path) -> int:
    pfns = [int(x) for x in (d / "pfns").read_text().split()]
    with Machine(32 << 20) as m:
        m.scatter_pages(pfns, (d / "pages").read_bytes())
        m.set_vcpu_state((d / "vcpu").read_bytes())
        while True:
            ex = m.run()
            assert ex.reason == EXIT_IO
            if ex.io_port == 0x604:
                return int.from_bytes(m.read(0x9000, 8), "little")
