getent group shelltrail >/dev/null || groupadd --system shelltrail
getent passwd shelltrail >/dev/null || useradd --system --gid shelltrail --home-dir /var/lib/shelltrail \
    --no-create-home --shell /sbin/nologin --comment "shelltrail agent" shelltrail
install -d -o shelltrail -g shelltrail -m 0750 /var/lib/shelltrail /var/lib/shelltrail/spool
# Certificates and keys: root installs them; each service's key is its own
# (owner shelltrail, mode 0400): the group may read recordings, never keys.
install -d -o root -g shelltrail -m 0750 /etc/shelltrail/tls
# The recorder may be a login shell (docs/deployment.md).
grep -qx /usr/bin/shelltrail-shell /etc/shells 2>/dev/null || echo /usr/bin/shelltrail-shell >> /etc/shells
# As the .deb does (and docs/deployment.md says): the agent runs from install on.
systemctl daemon-reload >/dev/null 2>&1 || :
systemctl enable --now shelltrail-agent.service >/dev/null 2>&1 || :
