"""``sync-server demo``: a server, a flaky job service and several SDK clients, with
faults injected, live progress and a closing report read from the server and the job
service (see ``examples.demo.runner``)."""

from examples.demo.runner import DemoOptions, DemoRunner, run_demo

__all__ = ["DemoOptions", "DemoRunner", "run_demo"]
