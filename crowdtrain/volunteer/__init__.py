"""The volunteer's side: the worker loop (`worker`), its HTTP client (`client`), its own
files (`files`), the round in progress (`resume`), progress bars (`progress`), and one
volunteer as several processes (`ranks`, `launch`). Imports `run`, `wire` and `errors`;
never the coordinator's side."""
