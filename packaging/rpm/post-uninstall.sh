# $1: 0 after erase, 1 after an upgrade. After an upgrade the new files are
# in place: restart the agent on them if it runs (its socket stays with
# systemd meanwhile, so no login finds it missing). After an erase, forget
# the removed units. Recordings and keys stay (docs/deployment.md, Uninstall).
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -ge 1 ]; then
    systemctl try-restart shelltrail-agent.service >/dev/null 2>&1 || :
fi
