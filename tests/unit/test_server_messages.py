"""The one-line reasons `recserve serve` gives when tritonserver stops, from real log lines."""

from recserve.server import _failure_reason

NOISE = 'E1121 07:42:06.1 7955 pinned_memory_manager.cc:170] "CudaDriverHelper has not been initialized."'


def test_an_invalid_ensemble_is_reported_by_the_repository_managers_line():
    lines = [NOISE,
             'E1121 07:42:16.794740 8429 model_repository_manager.cc:703] "Invalid argument: ensemble recommend '
             'allows maximum batch size 256, but it contains model ranker_inputs which only allows maximum batch '
             'size to be 32"',
             "error: creating server: Internal - failed to load all models"]
    reason = _failure_reason(lines, {})
    assert reason.startswith("model repository rejected: Invalid argument: ensemble recommend allows")
    assert reason.endswith("to be 32")


def test_a_model_whose_initialize_raises_is_named():
    lines = [NOISE, "E1121 07:00:00.0 1 model_lifecycle.cc:654] \"failed to load 'retrieval' version 1: "
                    "Internal: RuntimeError: the FAISS index was built from item tower 000000000000\\nTraceback\""]
    assert _failure_reason(lines, {}) == ("model 'retrieval' failed to load: Internal: RuntimeError: the FAISS index "
                                          "was built from item tower 000000000000")


def test_a_taken_port_names_the_flag_to_change():
    lines = ["E1121 07:00:00.0 1 grpc_server.cc:2463] \"Socket '127.0.0.1:8001' already in use \""]
    expected = "port 8001 is already in use; pass --grpc-port with a free port"
    assert _failure_reason(lines, {8001: "--grpc-port"}) == expected


def test_free_ports_are_distinct_and_each_can_be_bound():
    import socket

    from recserve.server import free_ports

    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
