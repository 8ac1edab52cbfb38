getent group shelltrail >/dev/null || groupadd --system shelltrail
getent passwd shelltrail >/dev/null || useradd --system --gid shelltrail --home-dir /var/lib/shelltrail \
    --no-create-home --shell /sbin/nologin --comment "shelltrail agent" shelltrail
install -d -o shelltrail -g shelltrail -m 0750 /var/lib/shelltrail /var/lib/shelltrail/spool
# Certificates and keys: root's to write, the services' (group shelltrail) to read.
install -d -o root -g shelltrail -m 0750 /etc/shelltrail/tls
systemctl daemon-reload >/dev/null 2>&1 || :
