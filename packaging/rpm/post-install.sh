# $1: 1 on first install, 2 on upgrade.
# /var/lib/shelltrail and /run/shelltrail are left to systemd (StateDirectory=,
# RuntimeDirectory= in the units): the service user owns them, so nothing here,
# running as root, creates, chowns or chmods anything there (a link the service
# user planted would make root change whatever it points to).
# The users and groups exist already (packaging/rpm/pre-install.sh).
# Break-glass (see packaging/debian/postinst) and its fallback directory.
systemd-tmpfiles --create shelltrail.conf >/dev/null 2>&1 || \
    { [ -e /var/lib/shelltrail-breakglass ] || install -d -o shelltrail-rec -g shelltrail -m 2770 /var/lib/shelltrail-breakglass; }
# Certificates and keys: root installs them; each service's key is its own
# (owner shelltrail, mode 0400): the group may read recordings, never keys.
install -d -o root -g shelltrail -m 0750 /etc/shelltrail/tls
for key in /etc/shelltrail/tls/*.key; do
    [ -f "$key" ] && [ ! -L "$key" ] || continue
    chown shelltrail:shelltrail "$key"
    chmod 0400 "$key"
done
# The recorder set-uid to shelltrail-rec, with the two capabilities it uses for
# a moment at start (see packaging/debian/postinst).
recorder_setuid() {
    if ! command -v setcap >/dev/null 2>&1; then
        echo "shelltrail: setcap is missing (dnf install libcap), so /usr/bin/shelltrail-shell cannot" \
            "get the capabilities it needs and recorded logins would be refused. Install it, then" \
            "reinstall shelltrail" >&2
        exit 1
    fi
    chown shelltrail-rec:root /usr/bin/shelltrail-shell
    chmod 4755 /usr/bin/shelltrail-shell
    setcap cap_chown,cap_sys_tty_config+ep /usr/bin/shelltrail-shell
}
# Set here rather than on the packaged file: the user exists only once this
# script has run. `rpm -V shelltrail` therefore reports the recorder's mode,
# owner and capabilities as changed; that is this step, not tampering.
recorder_setuid
# The recorder is deliberately not added to /etc/shells (see packaging/debian/postinst).
systemctl daemon-reload >/dev/null 2>&1 || :
# As the .deb does (and docs/deployment.md says): the agent runs from the first
# install on; an upgrade leaves an admin's choice (disabled, stopped) alone.
if [ "$1" = 1 ]; then
    systemctl enable --now shelltrail-agent.socket shelltrail-agent.service >/dev/null 2>&1 || :
else
    systemctl try-restart shelltrail-agent.service >/dev/null 2>&1 || :
fi
