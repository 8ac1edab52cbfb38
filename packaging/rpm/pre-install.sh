# $1: 1 on first install, 2 on upgrade. Runs before the files are laid
# down, so that the directories the package owns can belong to the
# service's user. The users and groups of /usr/lib/sysusers.d/shelltrail.conf
# (that file is not on disk yet: its entries are given inline); without
# systemd, the same by hand (each step skips what exists).
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers - <<'SYSUSERS'
g shelltrail -
u shelltrail - "shelltrail agent" /nonexistent /usr/sbin/nologin
u shelltrail-rec - "shelltrail recorder" /nonexistent /usr/sbin/nologin
g shelltrail-breakglass -
SYSUSERS
fi
getent group shelltrail >/dev/null || groupadd --system shelltrail
getent passwd shelltrail >/dev/null || useradd --system --gid shelltrail --home-dir /nonexistent \
    --no-create-home --shell /sbin/nologin --comment "shelltrail agent" shelltrail
# The recorder's own identity: no login shell, no home.
getent passwd shelltrail-rec >/dev/null || useradd --system --user-group --home-dir /nonexistent \
    --no-create-home --shell /sbin/nologin --comment "shelltrail recorder" shelltrail-rec
getent group shelltrail-breakglass >/dev/null || groupadd --system shelltrail-breakglass
exit 0
