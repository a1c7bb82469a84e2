package source

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// CheckURL returns an error unless raw, the URL of a poll or tail source,
// is an absolute http or https URL with a host, once its placeholders are
// expanded. The scheme is literal. {env.*} placeholders may stand anywhere
// after it, the host and port included, and are checked for form only;
// every other placeholder ({sse_feed.last_id}, a request's, a global one)
// only in the path, query or fragment, since it must not choose the server
// that gets the configured headers. Errors never quote the query.
func CheckURL(raw string) error {
	scheme, _, ok := strings.Cut(raw, "://")
	if !ok || !isSchemeName(scheme) {
		return errors.New("url must start with http:// or https://")
	}
	if s := strings.ToLower(scheme); s != "http" && s != "https" {
		return fmt.Errorf("url scheme %q is not supported: use http or https", scheme)
	}
	var keys []string
	u, err := expandURL(raw, func(key string) string {
		keys = append(keys, key)
		return "0" // a valid host, port and path
	})
	if err != nil {
		return err
	}
	if u.Host == "" {
		return errors.New("url has no host")
	}
	for _, key := range keys {
		if strings.HasPrefix(key, "env.") {
			continue
		}
		without, err := expandURL(raw, func(k string) string {
			if k == key {
				return ""
			}
			return "0"
		})
		if err == nil && authority(without) == authority(u) {
			continue
		}
		if isPlaceholderName(key) {
			return fmt.Errorf("placeholder {%s} in the url's host or port: only {env.*} may stand before the path", key)
		}
		return errors.New("a placeholder in the url's host or port: only {env.*} may stand before the path")
	}
	return nil
}

// expandURL replaces the placeholders of raw by value(key), as Caddy's
// replacer finds them, and parses the result.
func expandURL(raw string, value func(key string) string) (*url.URL, error) {
	expanded, err := caddy.NewEmptyReplacer().ReplaceFunc(raw, func(key string, _ any) (any, error) {
		return value(key), nil
	})
	if err != nil {
		return nil, fmt.Errorf("invalid url: %w", err)
	}
	u, err := url.Parse(expanded)
	if err != nil {
		// A *url.Error quotes the whole URL; its cause quotes at most a
		// host, a port or an escape.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("invalid url: %w", err)
	}
	return u, nil
}

// authority returns the parts of u before the path: scheme, user info, host
// and port.
func authority(u *url.URL) string {
	return u.Scheme + "://" + u.User.String() + "@" + u.Host
}

// isSchemeName reports whether s has the form of a URL scheme.
func isSchemeName(s string) bool {
	for i, c := range s {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
		case i > 0 && ('0' <= c && c <= '9' || c == '+' || c == '-' || c == '.'):
		default:
			return false
		}
	}
	return s != ""
}

// isPlaceholderName reports whether key looks like a placeholder's name,
// and so can be quoted in an error without quoting a part of the URL.
func isPlaceholderName(key string) bool {
	for _, c := range key {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return key != ""
}
