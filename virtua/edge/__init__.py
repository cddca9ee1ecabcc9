"""What every listener does before trusting a peer: connection limits per source and on
unfinished handshakes (limits), the same for uvicorn's HTTP (guard), and bounded, strictly
parsed JSON bodies with one error shape (web). Below every layer that listens (nbd, api,
cluster's agent); imports only virtua.errors."""
