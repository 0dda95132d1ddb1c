from node_agent.protocol import gateway_proof, new_nonce, node_proof, proof_matches
from node_agent.settings import link_url


def test_proofs_depend_on_key_nonces_and_direction() -> None:
    g, n = new_nonce(), new_nonce()
    proof = node_proof("key", g, n, "node-1")
    assert proof_matches(proof, node_proof("key", g, n, "node-1"))
    assert not proof_matches(proof, node_proof("other", g, n, "node-1"))
    assert not proof_matches(proof, node_proof("key", new_nonce(), n, "node-1"))
    assert not proof_matches(proof, node_proof("key", g, n, "node-2"))
    # A node's proof can never pass as the gateway's, even with the same nonces.
    assert not proof_matches(gateway_proof("key", g, n, "node-1"), proof)
    assert not proof_matches(proof, None)


def test_the_link_uses_wss_for_an_https_gateway() -> None:
    assert link_url("https://gw.example:8443") == "wss://gw.example:8443/ws/node/"
    assert link_url("http://127.0.0.1:8000/") == "ws://127.0.0.1:8000/ws/node/"
