# $1: 1 on first install, 2 on upgrade.
getent group shelltrail >/dev/null || groupadd --system shelltrail
getent passwd shelltrail >/dev/null || useradd --system --gid shelltrail --home-dir /var/lib/shelltrail \
    --no-create-home --shell /sbin/nologin --comment "shelltrail agent" shelltrail
install -d -o shelltrail -g shelltrail -m 0750 /var/lib/shelltrail /var/lib/shelltrail/spool
# Certificates and keys: root installs them; each service's key is its own
# (owner shelltrail, mode 0400): the group may read recordings, never keys.
install -d -o root -g shelltrail -m 0750 /etc/shelltrail/tls
for key in /etc/shelltrail/tls/*.key; do
    [ -f "$key" ] || continue
    chown shelltrail:shelltrail "$key"
    chmod 0400 "$key"
done
# The recorder is deliberately not added to /etc/shells (see packaging/debian/postinst).
systemctl daemon-reload >/dev/null 2>&1 || :
# As the .deb does (and docs/deployment.md says): the agent runs from the first
# install on; an upgrade leaves an admin's choice (disabled, stopped) alone.
if [ "$1" = 1 ]; then
    systemctl enable --now shelltrail-agent.service >/dev/null 2>&1 || :
else
    systemctl try-restart shelltrail-agent.service >/dev/null 2>&1 || :
fi
